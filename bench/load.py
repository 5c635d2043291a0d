"""A closed-loop load generator: N callers, each starting its next call when the last ends."""

import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (state, ppid, ...); FileNotFoundError when the
    process is not here."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by a process and its descendants, those that have
    ended included (a database server's backends come and go)."""
    try:
        fields = _stat_fields(pid)
        children = " ".join(
            path.read_text() for path in Path(f"/proc/{pid}/task").glob("*/children")
        ).split()
    except FileNotFoundError:
        return 0.0
    # utime and stime, then cutime and cstime: its own, and its ended children's.
    own = sum(int(ticks) for ticks in fields[11:15]) / _TICKS
    return own + sum(process_tree_cpu_seconds(int(child)) for child in children)


def parent_pid(pid: int) -> int | None:
    """The process's parent, or None when there is no such process here."""
    try:
        return int(_stat_fields(pid)[1])
    except OSError:
        return None


@dataclass(frozen=True)
class Sample:
    calls: int
    seconds: float
    latencies_ms: list[float]
    # CPU spent meanwhile by the server (and its workers), by the database server (all its
    # processes), and by this process, the client; None where not measured.
    server_cpu_seconds: float | None = None
    database_cpu_seconds: float | None = None
    client_cpu_seconds: float | None = None

    def _per_call_us(self, cpu_seconds: float | None) -> float | None:
        if cpu_seconds is None or not self.calls:
            return None
        return cpu_seconds / self.calls * 1e6

    @property
    def server_cpu_us_per_call(self) -> float | None:
        """The server's CPU per call: steadier than throughput on a shared, noisy machine."""
        return self._per_call_us(self.server_cpu_seconds)

    @property
    def database_cpu_us_per_call(self) -> float | None:
        return self._per_call_us(self.database_cpu_seconds)

    @property
    def client_cpu_us_per_call(self) -> float | None:
        return self._per_call_us(self.client_cpu_seconds)

    @property
    def per_second(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _cpu_seconds(pid: int | None) -> float | None:
    return None if pid is None else process_tree_cpu_seconds(pid)


def _spent(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


async def drive(
    call: Callable[[], Awaitable[object]],
    *,
    concurrency: int,
    seconds: float,
    server_pid: int | None = None,
    database_pid: int | None = None,
) -> Sample:
    """Runs `call` from `concurrency` callers for about `seconds`; every call must succeed.

    Also the CPU this process spent meanwhile, and with `server_pid` and `database_pid`
    the CPU those processes and their descendants spent: added up, what a call costs the
    machine.
    """
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - started) * 1000)

    server_before, database_before = _cpu_seconds(server_pid), _cpu_seconds(database_pid)
    client_before = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return Sample(
        len(latencies),
        elapsed,
        latencies,
        _spent(server_before, _cpu_seconds(server_pid)),
        _spent(database_before, _cpu_seconds(database_pid)),
        time.process_time() - client_before,
    )


def median_rate(samples: list[Sample]) -> float:
    return statistics.median(sample.per_second for sample in samples)


def merged(samples: list[Sample]) -> Sample:
    def total(values: list[float | None]) -> float | None:
        return None if None in values else sum(values)  # type: ignore[arg-type]

    return Sample(
        sum(s.calls for s in samples),
        sum(s.seconds for s in samples),
        [latency for s in samples for latency in s.latencies_ms],
        total([s.server_cpu_seconds for s in samples]),
        total([s.database_cpu_seconds for s in samples]),
        total([s.client_cpu_seconds for s in samples]),
    )
