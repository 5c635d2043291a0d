"""A closed-loop load generator: N callers, each starting its next call when the last ends."""

import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by a process and its descendants."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = " ".join(
            path.read_text() for path in Path(f"/proc/{pid}/task").glob("*/children")
        ).split()
    except FileNotFoundError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / _TICKS
    return own + sum(process_tree_cpu_seconds(int(child)) for child in children)


@dataclass(frozen=True)
class Sample:
    calls: int
    seconds: float
    latencies_ms: list[float]
    server_cpu_seconds: float | None = None

    @property
    def server_cpu_us_per_call(self) -> float | None:
        """The server's CPU per call: steadier than throughput on a shared, noisy machine."""
        if self.server_cpu_seconds is None or not self.calls:
            return None
        return self.server_cpu_seconds / self.calls * 1e6

    @property
    def per_second(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def drive(
    call: Callable[[], Awaitable[object]],
    *,
    concurrency: int,
    seconds: float,
    server_pid: int | None = None,
) -> Sample:
    """Runs `call` from `concurrency` callers for about `seconds`; every call must succeed.

    With `server_pid`, also the CPU that server process (and its workers) spent meanwhile.
    """
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - started) * 1000)

    cpu_before = None if server_pid is None else process_tree_cpu_seconds(server_pid)
    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu = None if server_pid is None else process_tree_cpu_seconds(server_pid) - cpu_before
    return Sample(len(latencies), elapsed, latencies, cpu)


def median_rate(samples: list[Sample]) -> float:
    return statistics.median(sample.per_second for sample in samples)


def merged(samples: list[Sample]) -> Sample:
    cpu = [s.server_cpu_seconds for s in samples]
    return Sample(
        sum(s.calls for s in samples),
        sum(s.seconds for s in samples),
        [latency for s in samples for latency in s.latencies_ms],
        None if None in cpu else sum(cpu),  # type: ignore[arg-type]
    )
