"""Postiz API keys at rest: AES-256-GCM under a key ring from the environment.

One key, named by PUBLISHER_ENCRYPTION_KEY_ID, encrypts; every key of the ring decrypts. A new
key is first added to every instance's ring, then named as the one that encrypts, and the old
one is dropped once `suitectl postiz reencrypt` has moved every row to the new one. Reading never
rewrites a row: an instance that does not know a key yet must still read every row.

The ciphertext is bound to the profile and to the base_url the key is sent to (authenticated
data), so a ciphertext copied onto another profile's row, or a row pointed at another host,
does not decrypt. Format 2 (`pzk\\x02`, nonce, ciphertext) binds both; format 1 (nonce,
ciphertext), written before base_url was bound, binds the profile only. Format 1 is still read
and reencryption upgrades it.
"""

import hashlib
import json
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.runtime.errors import FailedPrecondition

_NONCE_BYTES = 12
_FORMAT_2 = b"pzk\x02"
_SET_AGAIN = "set the credentials again with SetPostizCredentials"


def api_key_fingerprint(api_key: str) -> str:
    """Enough to tell two keys apart, never enough to use one."""
    return "sha256:" + hashlib.sha256(api_key.encode()).hexdigest()[:16]


def _bound_to(profile_id: str, base_url: str) -> bytes:
    """Format 2's authenticated data: unambiguous whatever the two strings hold."""
    return json.dumps(["postiz-api-key/2", profile_id, base_url]).encode()


@dataclass(frozen=True, slots=True)
class Sealed:
    """An API key as stored: the id of the key that encrypted it, and the ciphertext."""

    key_id: str
    blob: bytes


class ApiKeyCipher:
    def __init__(self, keys: dict[str, bytes], current_key_id: str) -> None:
        if current_key_id not in keys:
            raise ValueError(f"the encrypting key {current_key_id!r} is not among the keys")
        self._keys = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self.current_key_id = current_key_id

    def encrypt(self, profile_id: str, base_url: str, api_key: str) -> Sealed:
        """Format 2 under the current key."""
        nonce = os.urandom(_NONCE_BYTES)
        aead = self._keys[self.current_key_id]
        sealed = aead.encrypt(nonce, api_key.encode(), _bound_to(profile_id, base_url))
        return Sealed(self.current_key_id, _FORMAT_2 + nonce + sealed)

    def decrypt(self, profile_id: str, base_url: str, sealed: Sealed) -> str:
        """The API key; FailedPrecondition asking for new credentials when it cannot be read."""
        return self._open(profile_id, base_url, sealed)[0]

    def reencrypted(self, profile_id: str, base_url: str, sealed: Sealed) -> Sealed | None:
        """The key sealed again under the current key in format 2, or None when it already is."""
        api_key, format_ = self._open(profile_id, base_url, sealed)
        if sealed.key_id == self.current_key_id and format_ == 2:
            return None
        return self.encrypt(profile_id, base_url, api_key)

    def _open(self, profile_id: str, base_url: str, sealed: Sealed) -> tuple[str, int]:
        aead = self._keys.get(sealed.key_id)
        if aead is None:
            raise FailedPrecondition(
                f"this profile's Postiz API key was encrypted with key {sealed.key_id!r}, which "
                f"this service does not hold; {_SET_AGAIN}"
            )
        blob = sealed.blob
        if blob.startswith(_FORMAT_2):
            body = blob[len(_FORMAT_2) :]
            try:
                plain = aead.decrypt(
                    body[:_NONCE_BYTES], body[_NONCE_BYTES:], _bound_to(profile_id, base_url)
                )
                return plain.decode(), 2
            except (InvalidTag, ValueError):
                pass  # moved or altered; or format 1 whose random nonce began with the prefix
        try:
            plain = aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], profile_id.encode())
        except (InvalidTag, ValueError):  # ValueError: too short to hold a nonce
            raise FailedPrecondition(
                "this profile's stored Postiz API key cannot be decrypted for this profile and "
                f"base URL; {_SET_AGAIN}"
            ) from None
        return plain.decode(), 1
