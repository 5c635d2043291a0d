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
from collections import deque
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar, Token
from typing import Any

# Outside a call (a test, a start-up task) there is nothing to share.
_NO_TURN = contextlib.nullcontext()
_current_turn: ContextVar[AbstractAsyncContextManager] = ContextVar("turn", default=_NO_TURN)


def cpu_turn() -> AbstractAsyncContextManager:
    """The running call's profile turn, for `async with cpu_turn():` around a costly section."""
    return _current_turn.get()


def _done() -> asyncio.Future:
    """A future that is already done (with None): awaiting it returns at once, in C."""
    future = asyncio.Future(loop=asyncio.new_event_loop())
    future.set_result(None)
    future.get_loop().close()
    return future


_DONE = _done()


class Turn:
    """A profile's turn: a lock whose sections run one at a time, first come first served, as
    with asyncio.Lock. A section that finds the turn free (nobody holds it, nobody waits) takes
    it without a coroutine: `__aenter__` and `__aexit__` then return a future already done.
    Most sections do: they do not yield while they hold the turn."""

    __slots__ = ("_held", "_waiters")

    def __init__(self) -> None:
        self._held = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    def __aenter__(self) -> Any:
        if self._held or self._waiters:
            return self._wait()
        self._held = True
        return _DONE

    def __aexit__(self, *exc_info: object) -> Any:
        self._held = False
        if self._waiters:
            self._wake_first()
        return _DONE

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)
        except asyncio.CancelledError:
            if not self._held:
                self._wake_first()  # the turn this waiter was woken for passes on
            raise
        self._held = True

    def _wake_first(self) -> None:
        """Wakes the oldest waiter, unless it is woken already (or cancelled: it then wakes
        the next as it leaves)."""
        if self._waiters and not self._waiters[0].done():
            self._waiters[0].set_result(None)


class ProfileTurns:
    """One turn per profile with calls in flight; a profile's entry lives as long as it has a
    call in `entered`."""

    __slots__ = ("_turns",)

    def __init__(self) -> None:
        # key → [its turn, calls that entered and have not left]
        self._turns: dict[str, list] = {}

    def enter(self, key: str) -> tuple[Turn, Token]:
        """The profile's turn, made the running call's `cpu_turn()` until `leave`, which the
        call must reach once with the token returned."""
        entry = self._turns.get(key)
        if entry is None:
            entry = self._turns[key] = [Turn(), 0]
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
