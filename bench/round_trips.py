"""`python -m bench.round_trips`: database round trips and statements per call of each hot
operation, counted on the wire (bench/wire_counter.py): figures that do not move with the
machine. The services run in this process against DATABASE_URL (or an embedded server), in a
scratch database, one call at a time.
"""

import argparse
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import uvloop

from bench.hot_calls import HotCall, hot_calls
from bench.wire_counter import WireCounter, counting_proxy
from services.costs.service import costs_definition
from services.jobs.leasing import LeasePolicy
from services.jobs.service import JOBS, jobs_definition
from services.runtime.embedded_postgres import scratch_database, start_embedded_postgres
from services.runtime.server import migrate, start_service
from services.runtime.settings import Settings

CALLS = 50


@dataclass(frozen=True)
class Figure:
    operation: str
    round_trips: float
    statements: float


def via(database_url: str, host_port: str) -> str:
    """The URL of the same database and user through another host:port (a pooler, a proxy);
    a socket folder named in the query is the server's, so it is dropped."""
    parts = urlsplit(database_url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@{host_port}" if credentials else host_port
    return urlunsplit(parts._replace(netloc=netloc, query=""))


@asynccontextmanager
async def _suite(
    database_url: str, pooler: str | None
) -> AsyncIterator[tuple[WireCounter, grpc.aio.Channel, ...]]:
    """Jobs and Costs on loopback, their database reached through a counting proxy, and
    through the transaction pooler at `pooler` (host:port) behind it when one is given."""
    async with AsyncExitStack() as stack:
        connection = await asyncpg.connect(database_url)
        try:
            await migrate(JOBS, connection)
            await migrate(costs_definition(Path("unused")), connection)
        finally:
            await connection.close()
        upstream = database_url if pooler is None else via(database_url, pooler)
        proxy_url, counter = await stack.enter_async_context(counting_proxy(upstream))
        spool = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "spool.jsonl"
        settings = Settings(
            database_url=proxy_url,
            host="127.0.0.1",
            port=0,
            metrics_port=0,
            # The health check's SELECT 1 would count against whichever call it met.
            health_check_interval_seconds=3600,
            db_transaction_pooler=pooler is not None,
            database_listen_url=database_url,
        )
        channels = []
        # Nor the lease sweep's statement.
        jobs = jobs_definition(lease_policy=LeasePolicy(sweep_seconds=3600))
        for definition in (jobs, costs_definition(spool)):
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


async def measure(database_url: str, pooler: str | None = None) -> list[Figure]:
    """Each hot call's round trips and statements per call (through `pooler`, host:port of a
    PgBouncer in transaction mode in front of the same server, when one is given)."""
    async with _suite(database_url, pooler) as (counter, jobs_channel, costs_channel):
        return [
            Figure(hot.name, *await _per_call(counter, hot))
            for hot in await hot_calls(jobs_channel, costs_channel)
        ]


async def _run(pooler: str | None) -> list[Figure]:
    admin_url = os.environ.get("DATABASE_URL") or start_embedded_postgres(
        Path(".data/bench-postgres")
    )
    async with scratch_database(admin_url, "roundtrips") as url:
        return await measure(url, pooler)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.round_trips", description=__doc__)
    parser.add_argument(
        "--pooler",
        metavar="HOST:PORT",
        help="reach the database through this PgBouncer (transaction mode, in front of "
        "DATABASE_URL's server), as DB_TRANSACTION_POOLER does",
    )
    figures = uvloop.run(_run(parser.parse_args(argv).pooler))
    print(f"{'operation':<22} {'round trips/call':>16} {'statements/call':>15}")
    for figure in figures:
        print(f"{figure.operation:<22} {figure.round_trips:>16.2f} {figure.statements:>15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
