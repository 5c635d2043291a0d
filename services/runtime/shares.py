"""Each profile's fair share of something a replica has a limited amount of: its calls in
flight (the server interceptor), its open streams, its database connections (the pool).

A profile's burst queues behind its own holders, never in front of another profile's: beyond
the limit a caller waits a short while for one of the same profile's holders to leave (at
most `max_waiting` wait), then is refused with RESOURCE_EXHAUSTED and a retry delay. A
profile's entry exists only while it holds or waits, so the state stays as small as the
traffic.
"""

import asyncio
from collections import deque

from services.runtime.errors import ResourceExhausted

# A key of its own for the operators' cross-profile reads: never a valid profile id.
CROSS_PROFILE_KEY = "*"
# What a refused caller is told to wait: long enough for a burst's calls to drain.
RETRY_AFTER_SECONDS = 1.0


class ProfileShares:
    """At most `limit` calls in flight per profile (0: no limit); `what` names them in the
    refusal ("calls in flight", "streams open").

    `try_enter` is the whole cost of a call under the limit; `enter_when_free` is awaited
    only beyond it. Every entered call must `leave`, once.
    """

    __slots__ = ("_in_flight", "_limit", "_max_waiting", "_queue_seconds", "_waiting", "_what")

    def __init__(
        self,
        limit: int,
        queue_seconds: float = 0.0,
        what: str = "calls in flight",
        max_waiting: int | None = None,
    ):
        if limit < 0 or queue_seconds < 0:
            raise ValueError("limit and queue_seconds must not be negative")
        self._limit = limit
        # How many of a profile's callers may wait: the limit unless told otherwise.
        self._max_waiting = limit if max_waiting is None else max_waiting
        self._queue_seconds = queue_seconds
        self._what = what
        self._in_flight: dict[str, int] = {}
        # Calls waiting for a slot, oldest first; a future's result says whether it got one.
        self._waiting: dict[str, deque[asyncio.Future[bool]]] = {}

    def in_flight(self, key: str) -> int:
        return self._in_flight.get(key, 0)

    def profiles(self) -> int:
        """How many profiles have calls in flight or waiting."""
        return len(self._in_flight.keys() | self._waiting.keys())

    def try_enter(self, key: str) -> bool:
        """Takes a slot if one is free (always, with no limit); False when the profile is at
        its limit. A slot freed while others wait passes to them, so a free slot means no
        call of this profile is waiting."""
        if not self._limit:
            return True
        count = self._in_flight.get(key, 0)
        if count >= self._limit:
            return False
        self._in_flight[key] = count + 1
        return True

    async def enter_when_free(self, key: str, deadline_seconds: float | None = None) -> None:
        """Waits, behind the profile's earlier waiters, for one of its calls to end; at most
        the queue time and `deadline_seconds`. ResourceExhausted when no slot came."""
        waiters = self._waiting.get(key)
        if waiters is None:
            waiters = self._waiting[key] = deque()
        wait = self._queue_seconds
        if deadline_seconds is not None:
            wait = min(wait, deadline_seconds)
        if wait <= 0 or len(waiters) >= self._max_waiting:
            if not waiters:
                del self._waiting[key]
            raise self._refusal()
        loop = asyncio.get_running_loop()
        slot: asyncio.Future[bool] = loop.create_future()
        waiters.append(slot)
        timer = loop.call_later(wait, _expire, slot)
        try:
            admitted = await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled() and slot.result():
                self.leave(key)  # handed a slot as the call was cancelled: pass it on
            raise
        finally:
            timer.cancel()
            if slot in waiters:
                waiters.remove(slot)
            if not waiters and self._waiting.get(key) is waiters:
                del self._waiting[key]
        if not admitted:
            raise self._refusal()

    def leave(self, key: str) -> None:
        """Frees the call's slot: to the profile's oldest waiter, else back to the replica."""
        if not self._limit:
            return
        waiters = self._waiting.get(key)
        while waiters:
            slot = waiters.popleft()
            if not slot.done():
                slot.set_result(True)
                return
        count = self._in_flight[key] - 1
        if count:
            self._in_flight[key] = count
        else:
            del self._in_flight[key]

    def _refusal(self) -> ResourceExhausted:
        return ResourceExhausted(
            f"this profile already has {self._limit} {self._what} on this replica, its "
            f"limit; retry in {RETRY_AFTER_SECONDS:g}s",
            RETRY_AFTER_SECONDS,
        )


def _expire(slot: asyncio.Future[bool]) -> None:
    if not slot.done():
        slot.set_result(False)
