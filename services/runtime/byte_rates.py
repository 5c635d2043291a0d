"""Each profile's bytes per second through a replica: what its requests and replies carry.

The other fair shares bound what a profile holds at once (calls, streams, connections); this
one bounds how fast it may go through the replica's CPU, which is spent in proportion to the
bytes a call carries in and out (decoding, copying to and from Postgres, encoding). A profile
that floods a replica with large messages then runs at its own rate, and the others keep the
rest of the event loop.

A token bucket per profile, `rate` bytes a second up to `burst`, which may go into debt: a
reply is charged once it is built (its size is known only then), so a large reply puts its
profile in debt, and the profile's next message waits until the debt is paid. A message waits
at most `max_wait` seconds (and never past its call's deadline); a unary call that would wait
longer is refused with RESOURCE_EXHAUSTED and the delay after which it would pass. A stream's
messages simply wait their turn, which slows the stream to the rate. A profile's entry is
forgotten once its bucket is full again, at the next pruning.
"""

import asyncio
import time

from services.runtime.errors import ResourceExhausted

_PRUNE_AT_LEAST = 1024


class ProfileByteRates:
    __slots__ = ("_buckets", "_burst", "_max_wait", "_prune_at", "_rate")

    def __init__(self, rate: float, burst: float, max_wait: float) -> None:
        """rate 0: no limit."""
        if rate < 0 or burst < 0 or max_wait < 0:
            raise ValueError("rate, burst and max_wait must not be negative")
        self._rate = rate
        self._burst = max(burst, rate)
        self._max_wait = max_wait
        # profile → (tokens, when they were counted); tokens below 0 are debt.
        self._buckets: dict[str, tuple[float, float]] = {}
        # Full buckets are forgotten when there are this many: twice what the last pruning
        # kept, so pruning costs a constant share of the charges however many profiles call.
        self._prune_at = _PRUNE_AT_LEAST

    def _tokens(self, key: str, now: float) -> float:
        tokens, counted = self._buckets.get(key, (self._burst, now))
        return min(self._burst, tokens + (now - counted) * self._rate)

    def wait_seconds(self, key: str) -> float:
        """How long the profile's next message waits: until its debt is paid. A profile with
        no bucket (a full one) costs a dictionary lookup."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0
        tokens = bucket[0] + (time.monotonic() - bucket[1]) * self._rate
        return 0.0 if tokens >= 0 else -tokens / self._rate

    def charge(self, key: str, size: int) -> None:
        """Takes `size` bytes from the profile's bucket, into debt if need be."""
        if not self._rate or not size:
            return
        now = time.monotonic()
        tokens = self._tokens(key, now) - size
        self._buckets[key] = (tokens, now)
        if len(self._buckets) >= self._prune_at:
            self._forget_full(now)

    async def admit(self, key: str, deadline_seconds: float | None, *, refuse: bool) -> None:
        """Waits until the profile's debt is paid: at most max_wait and the deadline. Past
        them a unary call (`refuse`) is refused with the delay it needs; a stream's message
        waits on, its deadline bounding it. Awaited only when wait_seconds says so: a call
        that need not wait costs no coroutine."""
        wait = self.wait_seconds(key)
        if not wait:
            return
        bound = self._max_wait if refuse else None
        if deadline_seconds is not None:
            bound = deadline_seconds if bound is None else min(bound, deadline_seconds)
        if bound is not None and wait > bound:
            if refuse:
                raise ResourceExhausted(
                    f"this profile is past its {self._rate / 1048576:g} MiB/s of requests and "
                    f"replies on this replica (PROFILE_BYTES_PER_SECOND); retry in {wait:.2f}s",
                    wait,
                )
            wait = bound
        await asyncio.sleep(wait)

    def profiles(self) -> int:
        """How many profiles have a bucket that is not full."""
        return len(self._buckets)

    def _forget_full(self, now: float) -> None:
        for key in [k for k in self._buckets if self._tokens(k, now) >= self._burst]:
            del self._buckets[key]
        self._prune_at = max(_PRUNE_AT_LEAST, 2 * len(self._buckets))
