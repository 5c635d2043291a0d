"""Each profile's calls a second through a replica, however cheap each call is.

The share of calls in flight (runtime.shares) bounds what a profile's started calls hold; it
cannot reach the calls gRPC has not started. gRPC starts a connection's calls one at a time,
in the order they arrived, before anything can read their profile: a profile that keeps
hundreds of calls outstanding (a retry storm, a runaway loop) keeps a queue in front of every
other profile's next call, even when each of its calls is cheap and few are in flight at once.
This rate keeps a profile's calls coming no faster than it may be served: past it, a call is
refused as soon as its profile is read, before its request is decoded, with the delay after
which one would pass, and a client that honours the delay (suite_client does, as every client
that wants served must) stops queueing in front of the others.

The generic cell rate algorithm: a token bucket of `burst` calls refilled at `rate` a second,
kept as one number per profile (when its bucket would be full again). A call that would find
the bucket empty waits for its token (at most `max_wait` and never past its deadline), its
token reserved so that waiting calls pass one at a time at the rate; beyond that it is refused
with RESOURCE_EXHAUSTED. A profile's entry is forgotten once its bucket is full, at the next
pruning.
"""

import random
import time

from services.runtime.errors import ResourceExhausted

_PRUNE_AT_LEAST = 1024
# What a refused caller is told to wait at least: a profile past its rate is sending in a
# loop, and every refusal still costs the replica the call's start.
MIN_RETRY_SECONDS = 1.0


class ProfileCallRates:
    __slots__ = ("_full_at", "_interval", "_max_wait", "_prune_at", "_rate", "_tolerance")

    def __init__(self, rate: float, burst: int, max_wait: float) -> None:
        """rate 0: no limit."""
        if rate < 0 or burst < 0 or max_wait < 0:
            raise ValueError("rate, burst and max_wait must not be negative")
        self._rate = rate
        self._interval = 1 / rate if rate else 0.0
        # How far ahead of now a profile's bucket may be emptied: burst calls, less the one
        # being let through.
        self._tolerance = (max(burst, 1) - 1) * self._interval
        self._max_wait = max_wait
        # profile → when its bucket is full again (the theoretical arrival time).
        self._full_at: dict[str, float] = {}
        self._prune_at = _PRUNE_AT_LEAST

    def reserve(self, key: str, deadline_seconds: float | None = None) -> float:
        """Takes a call's token from the profile's bucket: the seconds the call waits for it
        (0 with one to spare). ResourceExhausted, with the delay after which a call would pass,
        when the wait would be longer than max_wait or the call's deadline."""
        if not self._rate:
            return 0.0
        now = time.monotonic()
        full_at = max(self._full_at.get(key, now), now)
        wait = full_at - self._tolerance - now
        if wait > 0:
            bound = self._max_wait
            if deadline_seconds is not None:
                bound = min(bound, deadline_seconds)
            if wait > bound:
                # Spread over a second: a burst refused together does not return together.
                retry = max(wait, MIN_RETRY_SECONDS) + random.random()
                raise ResourceExhausted(
                    f"this profile is past its {self._rate:g} calls a second on this replica "
                    f"(PROFILE_CALLS_PER_SECOND); retry in {retry:.2f}s",
                    retry,
                )
        self._full_at[key] = full_at + self._interval
        if len(self._full_at) >= self._prune_at:
            self._forget_full(now)
        return max(wait, 0.0)

    def profiles(self) -> int:
        """How many profiles have a bucket that is not full."""
        return len(self._full_at)

    def _forget_full(self, now: float) -> None:
        for key in [k for k, full_at in self._full_at.items() if full_at <= now]:
            del self._full_at[key]
        # Twice what this pruning kept: pruning costs a constant share of the calls.
        self._prune_at = max(_PRUNE_AT_LEAST, 2 * len(self._full_at))
