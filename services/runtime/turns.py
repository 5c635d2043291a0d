"""Each profile's turn at the event loop: a replica's one thread of CPU, shared per profile
rather than per call.

asyncio runs whatever is ready in the order it became ready, so a profile with 30 costly
calls in flight puts 30 slices of CPU ahead of every other profile's next step, and a call of
a few steps waits behind that many slices at each. The costly sections of a call (decoding its
request, converting rows to messages, encoding its reply) therefore run inside its profile's
turn, one section per profile at a time: another profile's call waits behind at most one
section of each busy profile, however many calls each has in flight.

A turn costs a profile nothing it had: the loop runs one section at a time anyway, so a busy
profile's sections take no longer in all, and a turn nobody holds is taken without yielding.
A section never waits for I/O while it holds the turn (it would hold up its own profile's
other calls), but may yield to the loop between slices of its work: the profile keeps its
turn, the other profiles run.
"""

import asyncio
import contextlib
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar, Token

# Outside a call (a test, a start-up task) there is nothing to share.
_NO_TURN = contextlib.nullcontext()
_current_turn: ContextVar[AbstractAsyncContextManager] = ContextVar("turn", default=_NO_TURN)


def cpu_turn() -> AbstractAsyncContextManager:
    """The running call's profile turn, for `async with cpu_turn():` around a costly section."""
    return _current_turn.get()


class ProfileTurns:
    """One turn (a lock) per profile with calls in flight; a profile's entry lives as long as
    it has a call in `entered`."""

    __slots__ = ("_turns",)

    def __init__(self) -> None:
        # key → [its lock, calls that entered and have not left]
        self._turns: dict[str, list] = {}

    def enter(self, key: str) -> tuple[asyncio.Lock, Token]:
        """The profile's turn, made the running call's `cpu_turn()` until `leave`, which the
        call must reach once with the token returned."""
        entry = self._turns.get(key)
        if entry is None:
            entry = self._turns[key] = [asyncio.Lock(), 0]
        entry[1] += 1
        return entry[0], _current_turn.set(entry[0])

    def leave(self, key: str, token: Token) -> None:
        _current_turn.reset(token)
        entry = self._turns[key]
        entry[1] -= 1
        if not entry[1]:
            del self._turns[key]

    def profiles(self) -> int:
        """How many profiles have calls in flight."""
        return len(self._turns)
