"""Postiz API keys at rest: AES-GCM under a key ring, one named key encrypting."""

import base64
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.publisher.api_key_cipher import ApiKeyCipher, Sealed
from services.publisher.settings import encrypting_key_id, parse_encryption_keys
from services.runtime.errors import FailedPrecondition

OLD, NEW = os.urandom(32), os.urandom(32)
URL = "https://postiz.example/public/v1"


def format_1(key: bytes, key_id: str, profile_id: str, api_key: str) -> Sealed:
    """What the service stored before base_url was bound: nonce, then ciphertext of the profile."""
    nonce = os.urandom(12)
    return Sealed(key_id, nonce + AESGCM(key).encrypt(nonce, api_key.encode(), profile_id.encode()))


def test_the_named_key_encrypts_whatever_the_order_of_the_ring():
    sealed = ApiKeyCipher({"old": OLD, "new": NEW}, "new").encrypt("store-1", URL, "secret")
    assert sealed.key_id == "new"


def test_the_ciphertext_hides_the_api_key():
    sealed = ApiKeyCipher({"new": NEW}, "new").encrypt("store-1", URL, "secret-api-key")
    assert b"secret-api-key" not in sealed.blob


def test_a_key_encrypted_under_a_key_still_in_the_ring_decrypts():
    sealed = ApiKeyCipher({"old": OLD}, "old").encrypt("store-1", URL, "secret-api-key")
    rotated = ApiKeyCipher({"new": NEW, "old": OLD}, "new")
    assert rotated.decrypt("store-1", URL, sealed) == "secret-api-key"


def test_a_ciphertext_moved_to_another_profile_does_not_decrypt():
    cipher = ApiKeyCipher({"new": NEW}, "new")
    sealed = cipher.encrypt("store-1", URL, "secret-api-key")
    with pytest.raises(FailedPrecondition, match="SetPostizCredentials"):
        cipher.decrypt("store-2", URL, sealed)


def test_a_ciphertext_moved_to_another_base_url_does_not_decrypt():
    cipher = ApiKeyCipher({"new": NEW}, "new")
    sealed = cipher.encrypt("store-1", URL, "secret-api-key")
    with pytest.raises(FailedPrecondition, match="SetPostizCredentials"):
        cipher.decrypt("store-1", "https://attacker.example/public/v1", sealed)


def test_a_key_encrypted_under_a_dropped_key_asks_for_new_credentials():
    sealed = ApiKeyCipher({"old": OLD}, "old").encrypt("store-1", URL, "secret-api-key")
    with pytest.raises(FailedPrecondition, match="SetPostizCredentials"):
        ApiKeyCipher({"new": NEW}, "new").decrypt("store-1", URL, sealed)


def test_a_truncated_ciphertext_asks_for_new_credentials():
    with pytest.raises(FailedPrecondition, match="SetPostizCredentials"):
        ApiKeyCipher({"new": NEW}, "new").decrypt("store-1", URL, Sealed("new", b"short"))


def test_a_key_stored_in_format_1_still_decrypts():
    sealed = format_1(OLD, "old", "store-1", "secret-api-key")
    assert ApiKeyCipher({"old": OLD}, "old").decrypt("store-1", URL, sealed) == "secret-api-key"


def test_reencryption_upgrades_format_1_under_the_same_key_to_bind_the_base_url():
    cipher = ApiKeyCipher({"old": OLD}, "old")
    resealed = cipher.reencrypted("store-1", URL, format_1(OLD, "old", "store-1", "secret"))
    assert resealed is not None
    assert cipher.decrypt("store-1", URL, resealed) == "secret"
    with pytest.raises(FailedPrecondition):
        cipher.decrypt("store-1", "https://elsewhere.example", resealed)


def test_reencryption_moves_a_key_to_the_current_key():
    sealed = ApiKeyCipher({"old": OLD}, "old").encrypt("store-1", URL, "secret")
    cipher = ApiKeyCipher({"old": OLD, "new": NEW}, "new")
    resealed = cipher.reencrypted("store-1", URL, sealed)
    assert resealed is not None
    assert resealed.key_id == "new"
    assert ApiKeyCipher({"new": NEW}, "new").decrypt("store-1", URL, resealed) == "secret"


def test_reencryption_leaves_a_current_key_alone():
    cipher = ApiKeyCipher({"new": NEW}, "new")
    assert cipher.reencrypted("store-1", URL, cipher.encrypt("store-1", URL, "secret")) is None


def test_encryption_keys_are_read_in_any_order():
    raw = f"k2:{base64.b64encode(NEW).decode()}, k1:{base64.b64encode(OLD).decode()}"
    assert parse_encryption_keys(raw) == {"k1": OLD, "k2": NEW}


def test_the_only_key_encrypts_when_none_is_named():
    assert encrypting_key_id({"k1": OLD}, "") == "k1"


@pytest.mark.parametrize("named", ["", "k3"], ids=["unnamed", "not_in_the_ring"])
def test_with_several_keys_the_encrypting_key_must_be_named_from_the_ring(named):
    with pytest.raises(ValueError, match="PUBLISHER_ENCRYPTION_KEY_ID"):
        encrypting_key_id({"k1": OLD, "k2": NEW}, named)


@pytest.mark.parametrize("raw", ["", "k1", "k1:not-base64!", "k1:c2hvcnQ="])
def test_malformed_encryption_keys_are_refused_with_how_to(raw):
    with pytest.raises(ValueError, match="PUBLISHER_ENCRYPTION_KEYS"):
        parse_encryption_keys(raw)
