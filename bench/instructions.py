"""`python -m bench.instructions [--calls N] [--services-from PATH] [--noop-only]
[--only NAME ...]`: server instructions per call of each hot call, counted by valgrind's
callgrind: a figure that does not move with the machine's speed or load, unlike microseconds.

Jobs, Costs and the no-op gRPC servers (without and with the interceptor; behind it, a call
refused past its profile's call rate, untraced and traced) run under callgrind,
each a process of its own. For each call, after a warm-up, the server's counters are zeroed,
N calls made and the counters dumped, then again for 2N calls: (I(2N) - I(N)) / N is what one
call costs, whatever a window costs besides (the dump itself, timers). Every thread of the
server process counts (gRPC's own included). `--services-from` runs the servers from another
checkout of the repository (the same database and calls), to measure before and after a change
in one session. `--only` measures just the rows whose names contain one of the words given
(case-insensitive), and starts only the servers they need.
"""

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import uvloop

from bench.environment import free_port, serving
from bench.hot_calls import PROFILE, hot_calls
from services.runtime.embedded_postgres import scratch_database, start_embedded_postgres

REPO = Path(__file__).resolve().parent.parent
WARM_UP = 20
STARTUP_SECONDS = 600  # a Python service under callgrind takes minutes to import and start


@dataclass(frozen=True)
class Figure:
    operation: str
    instructions_per_call: float


@dataclass
class Traced:
    """A server process under callgrind, its dumps in `folder`."""

    process: asyncio.subprocess.Process
    folder: Path

    async def control(self, *flags: str) -> None:
        run = await asyncio.create_subprocess_exec(
            "callgrind_control",
            *flags,
            str(self.process.pid),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if await run.wait():
            raise RuntimeError(f"callgrind_control {' '.join(flags)} failed")

    async def instructions(self, calls: int, call: Callable[[], Awaitable[object]]) -> int:
        """The instructions the process ran while `calls` calls were made, one at a time."""
        await self.control("--zero")
        for _ in range(calls):
            await call()
        before = set(self.folder.iterdir())
        await self.control("--dump")
        (dump,) = set(self.folder.iterdir()) - before
        match = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(), re.MULTILINE)
        if match is None:
            raise RuntimeError(f"no instruction count in {dump}")
        return int(match.group(1))

    async def per_call(self, calls: int, call: Callable[[], Awaitable[object]]) -> float:
        for _ in range(WARM_UP):
            await call()
        once = await self.instructions(calls, call)
        twice = await self.instructions(2 * calls, call)
        return (twice - once) / calls


@asynccontextmanager
async def _traced(
    stack: AsyncExitStack, name: str, arguments: list[str], env: dict[str, str], cwd: Path
) -> AsyncIterator[tuple[Traced, grpc.aio.Channel]]:
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"callgrind-{name}-")))
    process = await asyncio.create_subprocess_exec(
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={folder}/callgrind.out",
        "--dump-instr=no",
        "--collect-jumps=no",
        sys.executable,
        *arguments,
        cwd=cwd,
        env=os.environ | env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    port = env["GRPC_PORT"]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Traced(process, folder), channel
    finally:
        await channel.close()
        process.terminate()
        await process.wait()


NOOP_ROWS = (
    ("no-op gRPC", []),
    ("no-op gRPC + interceptor", ["--interceptor"]),
    ("no-op refused (call rate)", ["--interceptor", "--refuse"]),
    ("no-op refused, traced", ["--interceptor", "--refuse", "--traced"]),
)
HOT_ROWS = {
    "jobs": ("CreateJob", "GetJob", "UpdateJob", "CancelJob"),
    "costs": ("RecordElevenLabsTTS", "RecordGeminiUsage", "CheckBudget", "GetBudget"),
}


def _chosen(name: str, only: list[str]) -> bool:
    """Whether row `name` is measured: every row without `--only`."""
    return not only or any(word.lower() in name.lower() for word in only)


async def measure(
    database_url: str,
    calls: int,
    services_from: Path,
    noop_only: bool = False,
    only: list[str] | None = None,
) -> list[Figure]:
    only = only or []
    common = {
        "DATABASE_URL": database_url,
        "GRPC_HOST": "127.0.0.1",
        "METRICS_PORT": "off",
        "HEALTH_CHECK_INTERVAL_SECONDS": "3600",
        "JOBS_LEASE_SWEEP_SECONDS": "3600",  # nor the lease sweep
        "DB_CONNECT_TIMEOUT_SECONDS": str(STARTUP_SECONDS),
        "PYTHONPATH": f"{services_from}:{services_from / 'gen'}",
    }
    figures = []
    async with AsyncExitStack() as stack:
        servers = {}
        services = () if noop_only else (("jobs", "services.jobs"), ("costs", "services.costs"))
        for name, module in services:
            if not any(_chosen(row, only) for row in HOT_ROWS[name]):
                continue
            env = common | {"GRPC_PORT": str(free_port())}
            if name == "costs":
                spool = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "spool.jsonl"
                env["COSTS_SPOOL_PATH"] = str(spool)
            servers[name] = await stack.enter_async_context(
                _traced(stack, name, ["-m", module], env, services_from)
            )
        for hot in await _hot_calls(servers):
            if not _chosen(hot.name, only):
                continue
            if hot.prepare is not None:
                await hot.prepare(WARM_UP + 3 * calls)
            traced = servers[hot.service][0]
            figures.append(Figure(hot.name, await traced.per_call(calls, hot.call)))
        for name, flags in NOOP_ROWS:
            if not _chosen(name, only):
                continue
            port = str(free_port())
            arguments = ["-m", "bench.noop_server", port, *flags]
            env = common | {"GRPC_PORT": port}
            traced, channel = await stack.enter_async_context(
                _traced(stack, name, arguments, env, services_from)
            )
            noop = channel.unary_unary("/bench.Noop/Call")
            await noop(b"", metadata=PROFILE, wait_for_ready=True, timeout=STARTUP_SECONDS)

            async def call(noop: grpc.aio.UnaryUnaryMultiCallable = noop) -> object:
                try:
                    return await noop(b"", metadata=PROFILE)
                except grpc.aio.AioRpcError as error:  # --refuse: past the call rate
                    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    return error

            figures.append(Figure(name, await traced.per_call(calls, call)))
    return figures


async def _hot_calls(servers: dict) -> list:
    channels = {}
    for name in ("jobs", "costs"):
        if name in servers:
            channels[name] = servers[name][1]
            await serving(channels[name], STARTUP_SECONDS)
    if not channels:
        return []
    return await hot_calls(channels.get("jobs"), channels.get("costs"))


async def _run(calls: int, services_from: Path, noop_only: bool, only: list[str]) -> list[Figure]:
    admin_url = os.environ.get("DATABASE_URL") or start_embedded_postgres(
        REPO / ".data/bench-postgres"
    )
    async with scratch_database(admin_url, "instructions") as url:
        return await measure(url, calls, services_from, noop_only, only)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--calls", type=int, default=50, help="N: calls per window (default 50)")
    parser.add_argument(
        "--services-from",
        type=Path,
        default=REPO,
        help="the checkout whose services run (default: this one)",
    )
    parser.add_argument(
        "--noop-only",
        action="store_true",
        help="only the no-op rows (the interceptor's own cost, served, refused, traced)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="only the rows whose names contain NAME (repeatable; e.g. GetJob, interceptor)",
    )
    args = parser.parse_args(argv)
    figures = uvloop.run(_run(args.calls, args.services_from.resolve(), args.noop_only, args.only))
    print(f"{'operation':<28} {'server instructions/call':>24}")
    for figure in figures:
        print(f"{figure.operation:<28} {figure.instructions_per_call:>24,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
