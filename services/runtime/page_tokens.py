"""Keyset pagination (AIP-158): page sizes, and opaque page tokens.

Every list of the suite is newest first on (a time, an id). A token carries the last row's
sort key (the time in whole microseconds, so it round-trips exactly), the filters it was made
for and the profile it was made for ("*" for an operator's read across profiles), under a
checksum, so a tampered token or one reused with other filters or another profile is refused
with INVALID_ARGUMENT instead of silently paging the wrong list. The checksum is keyed with the
deployment's own secret (PAGE_TOKEN_KEY, set once at start-up with `use_key`), so only its
replicas can make a token: a caller cannot forge one with a position or filters of its
choosing. Without one (AUTH_MODE=none, local use only) the key is a development constant.
"""

import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from services.runtime.call_context import current_caller, current_profile_id, require_profile_id
from services.runtime.errors import InvalidArgument

DEVELOPMENT_KEY = b"page-token-v1"
_key = DEVELOPMENT_KEY
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_INVALID = "page_token is not valid; pass next_page_token from the previous response unchanged"

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

# The sort key of the last row of a page: (its time, its id). Our own rows have UUIDs;
# rows read from elsewhere (Postiz posts) keep their ids as strings.
KeysetPosition = tuple[datetime, uuid.UUID | str]
RowId = TypeVar("RowId", uuid.UUID, str)


def page_size(requested: int) -> int:
    """0 means DEFAULT_PAGE_SIZE; more than MAX_PAGE_SIZE is capped; negative is refused."""
    if requested < 0:
        raise InvalidArgument("page_size must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def use_key(key: bytes) -> None:
    """Signs and checks tokens with this process's deployment key from now on."""
    global _key
    _key = key


def _digest(body: bytes) -> bytes:
    return hmac.new(_key, body, hashlib.blake2b).digest()[:12]


def _scope() -> str:
    """The profile the list belongs to; "*" (never a profile id) for an operator's read."""
    profile_id = current_profile_id()
    if profile_id is None:
        caller = current_caller()
        if caller is not None and caller.operator:
            return "*"
    return require_profile_id()


def _fingerprint(filters: Any) -> str:
    canonical = json.dumps([_scope(), filters], sort_keys=True, default=str)
    return hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()


def encode_page_token(position: KeysetPosition, filters: Any) -> str:
    """A token resuming after `position` for these filters."""
    moment, row_id = position
    micros = (moment - _EPOCH) // timedelta(microseconds=1)
    body = json.dumps(
        {"p": [micros, str(row_id)], "f": _fingerprint(filters)}, separators=(",", ":")
    ).encode()
    return base64.urlsafe_b64encode(_digest(body) + body).decode().rstrip("=")


def decode_page_token(
    token: str, filters: Any, parse_id: Callable[[str], RowId] = uuid.UUID
) -> tuple[datetime, RowId]:
    """The position a token resumes after, its id read by `parse_id`; InvalidArgument when
    it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        mac, body = raw[:12], raw[12:]
        if not hmac.compare_digest(mac, _digest(body)):
            raise ValueError("checksum mismatch")
        decoded = json.loads(body)
        (micros, row_id), fingerprint = decoded["p"], decoded["f"]
        position = (_EPOCH + timedelta(microseconds=micros), parse_id(row_id))
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as error:
        raise InvalidArgument(_INVALID) from error
    if fingerprint != _fingerprint(filters):
        raise InvalidArgument(
            "page_token was made for other filters; send the same filters as the first page, "
            "or start again without a token"
        )
    return position
