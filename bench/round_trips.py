"""`python -m bench.round_trips`: database round trips and statements per call of each hot
operation, counted on the wire (bench/wire_counter.py): figures that do not move with the
machine. The services run in this process against DATABASE_URL (or an embedded server), in a
scratch database, one call at a time.
"""

import os
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import uvloop

from bench.hot_calls import HotCall, hot_calls
from bench.wire_counter import WireCounter, counting_proxy
from services.costs.service import costs_definition
from services.jobs.service import JOBS
from services.runtime.embedded_postgres import scratch_database, start_embedded_postgres
from services.runtime.server import migrate, start_service
from services.runtime.settings import Settings

CALLS = 50


@dataclass(frozen=True)
class Figure:
    operation: str
    round_trips: float
    statements: float


@asynccontextmanager
async def _suite(database_url: str) -> AsyncIterator[tuple[WireCounter, grpc.aio.Channel, ...]]:
    """Jobs and Costs on loopback, their database reached through a counting proxy."""
    async with AsyncExitStack() as stack:
        connection = await asyncpg.connect(database_url)
        try:
            await migrate(JOBS, connection)
            await migrate(costs_definition(Path("unused")), connection)
        finally:
            await connection.close()
        proxy_url, counter = await stack.enter_async_context(counting_proxy(database_url))
        spool = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "spool.jsonl"
        settings = Settings(
            database_url=proxy_url,
            host="127.0.0.1",
            port=0,
            metrics_port=0,
            # The health check's SELECT 1 would count against whichever call it met.
            health_check_interval_seconds=3600,
        )
        channels = []
        for definition in (JOBS, costs_definition(spool)):
            service = await start_service(definition, settings)
            stack.push_async_callback(service.stop, 1)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
            stack.push_async_callback(channel.close)
            channels.append(channel)
        yield counter, *channels


async def _per_call(counter: WireCounter, hot: HotCall) -> tuple[float, float]:
    if hot.prepare is not None:
        await hot.prepare(5 + CALLS)
    for _ in range(5):  # connections opened, statements prepared
        await hot.call()
    before = counter.snapshot()
    for _ in range(CALLS):
        await hot.call()
    spent = counter.snapshot() - before
    return spent.round_trips / CALLS, spent.statements / CALLS


async def measure(database_url: str) -> list[Figure]:
    """Each hot call's round trips and statements per call."""
    async with _suite(database_url) as (counter, jobs_channel, costs_channel):
        return [
            Figure(hot.name, *await _per_call(counter, hot))
            for hot in await hot_calls(jobs_channel, costs_channel)
        ]


async def _run() -> list[Figure]:
    admin_url = os.environ.get("DATABASE_URL") or start_embedded_postgres(
        Path(".data/bench-postgres")
    )
    async with scratch_database(admin_url, "roundtrips") as url:
        return await measure(url)


def main() -> int:
    figures = uvloop.run(_run())
    print(f"{'operation':<22} {'round trips/call':>16} {'statements/call':>15}")
    for figure in figures:
        print(f"{figure.operation:<22} {figure.round_trips:>16.2f} {figure.statements:>15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
