"""The Publisher's Postiz settings from the environment: the hosts it trusts or allows, and the
limits of each call."""

import base64
import os

import pytest

from services.publisher.settings import PostizLimits, PublisherSettings

KEYS = "k1:" + base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("PUBLISHER_ENCRYPTION_KEYS", KEYS)
    return monkeypatch


def test_no_host_is_trusted_unless_named(environment):
    settings = PublisherSettings.from_environment()
    assert settings.postiz_trusted_hosts == frozenset()
    assert settings.postiz_limits == PostizLimits()


def test_trusted_and_allowed_hosts_are_read_as_lists(environment):
    environment.setenv("POSTIZ_TRUSTED_HOSTS", " 127.0.0.1, Postiz.Local ")
    environment.setenv("POSTIZ_ALLOWED_HOSTS", "api.postiz.com,postiz.local")
    settings = PublisherSettings.from_environment()
    assert settings.postiz_trusted_hosts == {"127.0.0.1", "postiz.local"}
    assert settings.postiz_allowed_hosts == {"api.postiz.com", "postiz.local"}


def test_limits_are_read_from_the_environment(environment):
    environment.setenv("POSTIZ_TIMEOUT_SECONDS", "12")
    environment.setenv("POSTIZ_CONNECTIONS_PER_PROFILE", "3")
    environment.setenv("POSTIZ_POOL_WAIT_SECONDS", "0.5")
    environment.setenv("POSTIZ_MAX_RESPONSE_BYTES", "1000")
    assert PublisherSettings.from_environment().postiz_limits == PostizLimits(12, 3, 0.5, 1000)


def test_a_profile_without_connections_is_refused_at_start(environment):
    environment.setenv("POSTIZ_CONNECTIONS_PER_PROFILE", "0")
    with pytest.raises(SystemExit, match="POSTIZ_CONNECTIONS_PER_PROFILE"):
        PublisherSettings.from_environment()
