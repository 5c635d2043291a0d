"""Postiz API keys at rest: AES-256-GCM under a key ring from the environment.

The newest key encrypts; every key of the ring decrypts, so keys rotate by putting a new one
first and dropping the old one once no row names it. The profile id is authenticated data: a
ciphertext copied onto another profile's row does not decrypt.
"""

import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.runtime.errors import FailedPrecondition

_NONCE_BYTES = 12


def api_key_fingerprint(api_key: str) -> str:
    """Enough to tell two keys apart, never enough to use one."""
    return "sha256:" + hashlib.sha256(api_key.encode()).hexdigest()[:16]


class ApiKeyCipher:
    def __init__(self, keys: dict[str, bytes]) -> None:
        if not keys:
            raise ValueError("at least one encryption key is required")
        self._keys = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self.current_key_id = next(iter(keys))

    def encrypt(self, profile_id: str, api_key: str) -> tuple[str, bytes]:
        """(key id, nonce + ciphertext) under the newest key."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._keys[self.current_key_id].encrypt(
            nonce, api_key.encode(), profile_id.encode()
        )
        return self.current_key_id, nonce + sealed

    def decrypt(self, profile_id: str, key_id: str, blob: bytes) -> str:
        aead = self._keys.get(key_id)
        if aead is None:
            raise FailedPrecondition(
                f"this profile's Postiz API key was encrypted with key {key_id!r}, which is no "
                "longer configured; set the credentials again with SetPostizCredentials"
            )
        try:
            plain = aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], profile_id.encode())
        except InvalidTag:
            raise FailedPrecondition(
                "this profile's stored Postiz API key cannot be decrypted; set the credentials "
                "again with SetPostizCredentials"
            ) from None
        return plain.decode()
