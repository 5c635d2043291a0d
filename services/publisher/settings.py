"""The Publisher's settings beyond the shared ones, from environment variables.

- `PUBLISHER_ENCRYPTION_KEYS` (required): `id:base64key[,id:base64key…]`, 32-byte AES keys,
  in any order: every key that may decrypt a stored API key.
- `PUBLISHER_ENCRYPTION_KEY_ID` (required with more than one key): the one that encrypts. A new
  key is added to every instance's keys before any instance encrypts with it (rotation).
- `PUBLISHER_POSTS_PER_HOUR` (30): each profile's budget of `POST /posts` per rolling hour.
- `POSTIZ_TIMEOUT_SECONDS` (30): one Postiz HTTP call in total, its answer included (an
  upload gets a second more for every 256 KiB of its size).
- `POSTIZ_CONNECTIONS_PER_PROFILE` (10): connections to its Postiz host a profile may hold.
- `POSTIZ_POOL_WAIT_SECONDS` (1): how long a call waits for one of them before
  RESOURCE_EXHAUSTED (at most half of POSTIZ_TIMEOUT_SECONDS).
- `POSTIZ_MAX_RESPONSE_BYTES` (10485760): the largest answer read from Postiz.
- `POSTIZ_GET_ATTEMPTS` (3): tries of a read before UNAVAILABLE.
- `POSTIZ_RETRY_BASE_SECONDS` (0.5): base of the exponential backoff, full jitter.
- `PUBLISHER_RECONCILE_GRACE_SECONDS` (60): how long after an attempt of unknown outcome
  Postiz is searched for the post it may have made.
- `POSTIZ_ALLOWED_HOSTS` (empty: any public host): comma-separated hosts a profile's
  base_url may name, when set the only ones.
- `POSTIZ_TRUSTED_HOSTS` (empty): comma-separated hosts exempt from the https and
  public-address rules, for a Postiz (or media) on this machine or network: a local fake
  Postiz on 127.0.0.1. Never set in a shared deployment.
- `JOBS_TARGET` (`localhost:50051`): the Jobs service, for PublishJob.
"""

import base64
import binascii
import os
from dataclasses import dataclass

from services.publisher.api_key_cipher import ApiKeyCipher
from services.runtime.settings import env_float, env_int

ENCRYPTION_KEYS_HOW_TO = (
    "PUBLISHER_ENCRYPTION_KEYS must be 'id:base64key[,id:base64key…]' with 32-byte keys and "
    'distinct ids; make one with: python -c "import os,base64;'
    "print('k1:'+base64.b64encode(os.urandom(32)).decode())\""
)


def _hosts(name: str) -> frozenset[str]:
    return frozenset(
        host.strip().lower() for host in os.environ.get(name, "").split(",") if host.strip()
    )


def parse_encryption_keys(raw: str) -> dict[str, bytes]:
    """`id:base64key,…` as a mapping of key id to key."""
    keys: dict[str, bytes] = {}
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        key_id, _, encoded = entry.partition(":")
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(ENCRYPTION_KEYS_HOW_TO) from None
        if not key_id or len(key) != 32 or key_id in keys:
            raise ValueError(ENCRYPTION_KEYS_HOW_TO)
        keys[key_id] = key
    if not keys:
        raise ValueError(ENCRYPTION_KEYS_HOW_TO)
    return keys


def encrypting_key_id(keys: dict[str, bytes], key_id: str) -> str:
    """The key PUBLISHER_ENCRYPTION_KEY_ID names; unnamed, the only key there is."""
    if not key_id and len(keys) == 1:
        return next(iter(keys))
    if key_id not in keys:
        raise ValueError(
            f"PUBLISHER_ENCRYPTION_KEY_ID must name the key that encrypts, one of "
            f"{', '.join(sorted(keys))}; got {key_id!r}"
        )
    return key_id


@dataclass(frozen=True)
class PostizLimits:
    """What one call to Postiz may take: time in total (body included), connections of its
    profile's pool, time waiting for one, and bytes of answer."""

    timeout_seconds: float = 30.0
    connections_per_profile: int = 10
    pool_wait_seconds: float = 1.0
    max_response_bytes: int = 10 * 1024 * 1024

    def __post_init__(self) -> None:
        if min(self.timeout_seconds, self.pool_wait_seconds) <= 0:
            raise ValueError("POSTIZ_TIMEOUT_SECONDS and POSTIZ_POOL_WAIT_SECONDS must be > 0")
        if min(self.connections_per_profile, self.max_response_bytes) < 1:
            raise ValueError(
                "POSTIZ_CONNECTIONS_PER_PROFILE and POSTIZ_MAX_RESPONSE_BYTES must be >= 1"
            )


@dataclass(frozen=True)
class PublisherSettings:
    encryption_keys: dict[str, bytes]
    encryption_key_id: str = ""  # the key that encrypts; empty: the only one there is
    posts_per_hour: int = 30
    postiz_limits: PostizLimits = PostizLimits()
    postiz_get_attempts: int = 3
    postiz_retry_base_seconds: float = 0.5
    reconcile_grace_seconds: float = 60.0
    jobs_target: str = "localhost:50051"
    postiz_allowed_hosts: frozenset[str] = frozenset()
    postiz_trusted_hosts: frozenset[str] = frozenset()

    def api_key_cipher(self) -> ApiKeyCipher:
        return ApiKeyCipher(
            self.encryption_keys, encrypting_key_id(self.encryption_keys, self.encryption_key_id)
        )

    def __repr__(self) -> str:
        return (
            f"PublisherSettings(keys={list(self.encryption_keys)}, "
            f"encrypting={self.encryption_key_id!r}, jobs={self.jobs_target})"
        )

    @classmethod
    def from_environment(cls) -> "PublisherSettings":
        try:
            keys = parse_encryption_keys(os.environ.get("PUBLISHER_ENCRYPTION_KEYS", ""))
            key_id = encrypting_key_id(keys, os.environ.get("PUBLISHER_ENCRYPTION_KEY_ID", ""))
            limits = PostizLimits(
                timeout_seconds=env_float("POSTIZ_TIMEOUT_SECONDS", PostizLimits.timeout_seconds),
                connections_per_profile=env_int(
                    "POSTIZ_CONNECTIONS_PER_PROFILE", PostizLimits.connections_per_profile
                ),
                pool_wait_seconds=env_float(
                    "POSTIZ_POOL_WAIT_SECONDS", PostizLimits.pool_wait_seconds
                ),
                max_response_bytes=env_int(
                    "POSTIZ_MAX_RESPONSE_BYTES", PostizLimits.max_response_bytes
                ),
            )
        except ValueError as error:
            raise SystemExit(str(error)) from None
        return cls(
            encryption_keys=keys,
            encryption_key_id=key_id,
            posts_per_hour=env_int("PUBLISHER_POSTS_PER_HOUR", cls.posts_per_hour),
            postiz_limits=limits,
            postiz_get_attempts=env_int("POSTIZ_GET_ATTEMPTS", cls.postiz_get_attempts),
            postiz_retry_base_seconds=env_float(
                "POSTIZ_RETRY_BASE_SECONDS", cls.postiz_retry_base_seconds
            ),
            reconcile_grace_seconds=env_float(
                "PUBLISHER_RECONCILE_GRACE_SECONDS", cls.reconcile_grace_seconds
            ),
            jobs_target=os.environ.get("JOBS_TARGET", cls.jobs_target),
            postiz_allowed_hosts=_hosts("POSTIZ_ALLOWED_HOSTS"),
            postiz_trusted_hosts=_hosts("POSTIZ_TRUSTED_HOSTS"),
        )
