"""A closed-loop load generator: N callers, each starting its next call when the last ends."""

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    calls: int
    seconds: float
    latencies_ms: list[float]

    @property
    def per_second(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def drive(
    call: Callable[[], Awaitable[object]], *, concurrency: int, seconds: float
) -> Sample:
    """Runs `call` from `concurrency` callers for about `seconds`; every call must succeed."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return Sample(len(latencies), time.perf_counter() - started, latencies)


def median_rate(samples: list[Sample]) -> float:
    return statistics.median(sample.per_second for sample in samples)


def merged(samples: list[Sample]) -> Sample:
    return Sample(
        sum(s.calls for s in samples),
        sum(s.seconds for s in samples),
        [latency for s in samples for latency in s.latencies_ms],
    )
