"""Who a call acts for, held in context variables for the whole of the call.

The server interceptor sets them once per RPC; the database layer, the log formatter and the
client interceptor read them, so no call site ever passes a profile id around by hand.
"""

import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from services.runtime.errors import InvalidArgument, Unauthenticated

PROFILE_METADATA_KEY = "x-profile-id"
AUTHORIZATION_METADATA_KEY = "authorization"
PROFILE_ID_RULE = (
    "1 to 64 characters of letters, digits, '_' or '-', starting with a letter or digit"
)
_PROFILE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

_current_profile_id: ContextVar[str | None] = ContextVar("profile_id", default=None)
_current_deadline: ContextVar[float | None] = ContextVar("deadline", default=None)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who makes the call, as the server's authorizer proved it.

    `authorization` is the incoming `authorization` metadata value, kept so that calls made
    to other services while serving this one carry the caller's own token.
    """

    subject: str
    operator: bool = False
    # A pipeline worker (scope "worker"): leases jobs of any profile, then acts for a job's
    # profile only on the jobs it holds.
    worker: bool = False
    authorization: str | None = field(default=None, repr=False)  # a bearer token: never log it


_current_caller: ContextVar[Caller | None] = ContextVar("caller", default=None)


def validate_profile_id(profile_id: str) -> str:
    """Returns the id unchanged, or raises InvalidArgument naming the rule it breaks."""
    if not _PROFILE_ID.fullmatch(profile_id):
        raise InvalidArgument(f"{PROFILE_METADATA_KEY} must be {PROFILE_ID_RULE}")
    return profile_id


def profile_id_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The caller's profile id from gRPC metadata, validated."""
    for key, value in metadata or ():
        if key == PROFILE_METADATA_KEY:
            if isinstance(value, bytes):
                raise InvalidArgument(f"{PROFILE_METADATA_KEY} must be text, not binary")
            return validate_profile_id(value)
    raise Unauthenticated(f"{PROFILE_METADATA_KEY} metadata is required")


def current_profile_id() -> str | None:
    """The profile the running call acts for, or None outside a call."""
    return _current_profile_id.get()


def require_profile_id() -> str:
    """The running call's profile; a programming error to ask outside a call."""
    profile_id = _current_profile_id.get()
    if profile_id is None:
        raise RuntimeError("no profile in scope: this code must run inside a profile's call")
    return profile_id


def current_caller() -> Caller | None:
    """Who makes the running call, or None outside a call or when nobody was proved."""
    return _current_caller.get()


def remaining_seconds() -> float | None:
    """Seconds left before the running call's deadline, or None when it has none."""
    deadline = _current_deadline.get()
    return None if deadline is None else deadline - time.monotonic()


class CallScope:
    """The current call's profile, caller and deadline, set until `close()`.

    The server interceptor opens one per RPC, with an id profile_id_from_metadata has
    validated; `profile_scope` is the same as a `with` block, and validates the id itself.
    A cross-profile read (an operator's call) has no profile: `profile_id` is None.
    """

    __slots__ = ("_caller_token", "_deadline_token", "_profile_token")

    def __init__(
        self,
        profile_id: str | None,
        time_remaining: float | None = None,
        caller: Caller | None = None,
    ) -> None:
        deadline = None if time_remaining is None else time.monotonic() + time_remaining
        self._profile_token = _current_profile_id.set(profile_id)
        self._deadline_token = _current_deadline.set(deadline)
        self._caller_token = _current_caller.set(caller)

    def close(self) -> None:
        _current_caller.reset(self._caller_token)
        _current_deadline.reset(self._deadline_token)
        _current_profile_id.reset(self._profile_token)


@contextmanager
def profile_scope(
    profile_id: str | None, time_remaining: float | None = None, caller: Caller | None = None
) -> Iterator[None]:
    """Acts for profile_id (and the call's deadline and caller) until the block ends;
    InvalidArgument for a malformed id."""
    if profile_id is not None:
        validate_profile_id(profile_id)
    scope = CallScope(profile_id, time_remaining, caller)
    try:
        yield
    finally:
        scope.close()
