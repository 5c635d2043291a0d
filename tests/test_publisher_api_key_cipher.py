"""Postiz API keys at rest: AES-GCM under a rotating key ring."""

import base64
import os

import pytest

from services.publisher.api_key_cipher import ApiKeyCipher
from services.publisher.settings import parse_encryption_keys
from services.runtime.errors import FailedPrecondition

OLD, NEW = os.urandom(32), os.urandom(32)


def test_the_newest_key_encrypts_and_the_ciphertext_hides_the_key():
    key_id, blob = ApiKeyCipher({"new": NEW, "old": OLD}).encrypt("store-1", "secret-api-key")
    assert key_id == "new"
    assert b"secret-api-key" not in blob


def test_a_key_encrypted_before_rotation_still_decrypts():
    key_id, blob = ApiKeyCipher({"old": OLD}).encrypt("store-1", "secret-api-key")
    rotated = ApiKeyCipher({"new": NEW, "old": OLD})
    assert rotated.decrypt("store-1", key_id, blob) == "secret-api-key"


def test_a_ciphertext_moved_to_another_profile_does_not_decrypt():
    cipher = ApiKeyCipher({"new": NEW})
    key_id, blob = cipher.encrypt("store-1", "secret-api-key")
    with pytest.raises(FailedPrecondition):
        cipher.decrypt("store-2", key_id, blob)


def test_a_key_encrypted_under_a_dropped_key_asks_for_new_credentials():
    key_id, blob = ApiKeyCipher({"old": OLD}).encrypt("store-1", "secret-api-key")
    with pytest.raises(FailedPrecondition, match="SetPostizCredentials"):
        ApiKeyCipher({"new": NEW}).decrypt("store-1", key_id, blob)


def test_encryption_keys_are_read_newest_first():
    raw = f"k2:{base64.b64encode(NEW).decode()}, k1:{base64.b64encode(OLD).decode()}"
    assert parse_encryption_keys(raw) == {"k2": NEW, "k1": OLD}


@pytest.mark.parametrize("raw", ["", "k1", "k1:not-base64!", "k1:c2hvcnQ="])
def test_malformed_encryption_keys_are_refused_with_how_to(raw):
    with pytest.raises(ValueError, match="PUBLISHER_ENCRYPTION_KEYS"):
        parse_encryption_keys(raw)
