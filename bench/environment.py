"""What the benchmark runs against: a scratch database with seeded data, the Jobs server and
the no-op servers as their own processes, and client channels to them."""

import asyncio
import os
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from costs.v1 import costs_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jobs.v1 import jobs_pb2_grpc

from bench.load import parent_pid
from bench.seed import (
    insert_jobs_of_many_profiles,
    insert_synthetic_jobs,
    insert_synthetic_lines,
)
from services.costs.service import costs_definition
from services.jobs.service import JOBS
from services.runtime.database import TenantScopedPool, create_pool
from services.runtime.embedded_postgres import scratch_database, start_embedded_postgres
from services.runtime.server import migrate

CONNECTIONS = 4
# The no-op servers: the gRPC ceiling, then the same handler behind the suite's interceptor as
# the services run it, then with an access line for every call (ACCESS_LOG=all).
NOOP_VARIANTS = {
    "no-op gRPC": (),
    "no-op gRPC + interceptor": ("--interceptor",),
    "no-op gRPC + interceptor, ACCESS_LOG=all": ("--interceptor", "--access-log", "all"),
}
COSTS = costs_definition()  # for its name, migrations and role; the server runs apart
COST_MONTH = datetime(2025, 5, 1, tzinfo=UTC)  # the seeded month of cost lines
POOL_SIZE = 10  # the server's default DB_POOL_MAX_SIZE, so the db ceiling is like for like


@asynccontextmanager
async def bench_database(options: Any) -> AsyncIterator[str]:
    """A database of its own on DATABASE_URL (or an embedded server), migrated and seeded:
    one profile with `big_profile_jobs` jobs among `other_profiles` other profiles, and one
    profile with `cost_lines` cost lines spread over COST_MONTH."""
    admin_url = os.environ.get("DATABASE_URL") or start_embedded_postgres(
        Path(".data/bench-postgres")
    )
    async with scratch_database(admin_url, "bench") as url:
        connection = await asyncpg.connect(url)
        try:
            await migrate(JOBS, connection)
            await migrate(COSTS, connection)
            print(f"seeding {options.big_profile_jobs:,} jobs ...", file=sys.stderr, flush=True)
            await insert_synthetic_jobs(connection, "bench-big", options.big_profile_jobs)
            await insert_jobs_of_many_profiles(
                connection, options.other_profiles, options.jobs_per_other_profile
            )
            print(f"seeding {options.cost_lines:,} cost lines ...", file=sys.stderr, flush=True)
            await insert_synthetic_lines(connection, "bench-costs", options.cost_lines, COST_MONTH)
            await connection.execute("VACUUM ANALYZE jobs.jobs, costs.entries, costs.daily_costs")
        finally:
            await connection.close()
        yield url


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Suite:
    jobs_pid: int
    noop: dict[str, tuple[int, grpc.aio.Channel]]  # NOOP_VARIANTS' server pids and channels
    jobs_stubs: list[jobs_pb2_grpc.JobServiceStub]
    costs_pid: int | None
    costs_stubs: list[costs_pb2_grpc.CostServiceStub]
    store_pool: TenantScopedPool
    costs_pool: TenantScopedPool
    database_pid: int | None  # the PostgreSQL server's main process, when it runs here

    @property
    def jobs_stub(self) -> jobs_pb2_grpc.JobServiceStub:
        return self.jobs_stubs[0]


async def _local_postmaster_pid(connection: asyncpg.Connection) -> int | None:
    """The pid of the PostgreSQL server's main process, whose children are its backends and
    helpers, when the server runs on this machine (a Unix socket or loopback); else None."""
    address = await connection.fetchval("SELECT host(inet_server_addr())")
    if address not in (None, "127.0.0.1", "::1"):
        return None
    return parent_pid(await connection.fetchval("SELECT pg_backend_pid()"))


async def _process(stack: AsyncExitStack, log_dir: Path, name: str, *args: str, **env: str):
    log = open(log_dir / f"{name}.log", "w")  # noqa: SIM115, ASYNC230 - once, before load
    stack.callback(log.close)
    process = await asyncio.create_subprocess_exec(
        sys.executable, *args, env=os.environ | env, stdout=log, stderr=log
    )

    async def stop() -> None:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 20)
        except TimeoutError:
            process.kill()
            await process.wait()

    stack.push_async_callback(stop)
    return process


async def _channel(stack: AsyncExitStack, port: int) -> grpc.aio.Channel:
    # A local subchannel pool gives each channel its own TCP connection.
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
    )
    stack.push_async_callback(channel.close)
    return channel


async def serving(channel: grpc.aio.Channel, within_seconds: float = 60) -> None:
    """Waits until the server behind `channel` answers health with SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(
        health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=within_seconds
    )
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError("the server did not become SERVING")


@asynccontextmanager
async def start_suite(database_url: str, *, workers: int, noop: bool) -> AsyncIterator[Suite]:
    async with AsyncExitStack() as stack:
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        jobs_port = free_port()
        jobs = await _process(
            stack,
            log_dir,
            "jobs",
            "-m",
            "services.jobs",
            DATABASE_URL=database_url,
            GRPC_HOST="127.0.0.1",
            GRPC_PORT=str(jobs_port),
            GRPC_WORKERS=str(workers),
            METRICS_PORT="0",
            MIGRATE_ON_START="false",
            DB_POOL_MAX_SIZE=str(POOL_SIZE),
            # The watch fan-out opens every watcher as one profile: 1,000 in the full run.
            PROFILE_MAX_STREAMS="0",
            JOBS_WATCHERS_PER_PROFILE="10000",
            # One profile drives each operation, as it drives the db ceiling's bare pool.
            DB_CONNECTIONS_PER_PROFILE="0",
            PROFILE_CALLS_PER_SECOND="0",
        )
        channels = [await _channel(stack, jobs_port) for _ in range(CONNECTIONS)]
        await asyncio.gather(*(serving(channel) for channel in channels))
        costs_pid, costs_channels = None, []
        if noop:
            costs_port = free_port()
            costs = await _process(
                stack,
                log_dir,
                "costs",
                "-m",
                "services.costs",
                DATABASE_URL=database_url,
                GRPC_HOST="127.0.0.1",
                GRPC_PORT=str(costs_port),
                MIGRATE_ON_START="false",
                DB_POOL_MAX_SIZE=str(POOL_SIZE),
                DB_CONNECTIONS_PER_PROFILE="0",
                PROFILE_CALLS_PER_SECOND="0",
                COSTS_SPOOL_PATH=str(log_dir / "spool.jsonl"),
            )
            costs_pid = costs.pid
            costs_channels = [await _channel(stack, costs_port) for _ in range(CONNECTIONS)]
            await asyncio.gather(*(serving(channel) for channel in costs_channels))
        noop_servers: dict[str, tuple[int, grpc.aio.Channel]] = {}
        for index, (name, flags) in enumerate(NOOP_VARIANTS.items() if noop else ()):
            port = free_port()
            noop_process = await _process(
                stack, log_dir, f"noop{index}", "-m", "bench.noop_server", str(port), *flags
            )
            channel = await _channel(stack, port)
            await channel.unary_unary("/bench.Noop/Call")(
                b"", metadata=(("x-profile-id", "ready"),), wait_for_ready=True, timeout=60
            )
            noop_servers[name] = (noop_process.pid, channel)
        raw_pool = await create_pool(database_url, min_size=POOL_SIZE, max_size=POOL_SIZE)
        stack.push_async_callback(raw_pool.close)
        async with raw_pool.acquire() as connection:
            database_pid = await _local_postmaster_pid(connection)
        yield Suite(
            jobs_pid=jobs.pid,
            noop=noop_servers,
            jobs_stubs=[jobs_pb2_grpc.JobServiceStub(channel) for channel in channels],
            store_pool=TenantScopedPool(raw_pool, JOBS.database_role),
            costs_pid=costs_pid,
            costs_stubs=[costs_pb2_grpc.CostServiceStub(channel) for channel in costs_channels],
            costs_pool=TenantScopedPool(raw_pool, COSTS.database_role),
            database_pid=database_pid,
        )
