"""`python -m services.costs.benchmark`: how fast a month's summary answers for a profile with
a million lines.

Makes a scratch database on DATABASE_URL's server, migrates it, writes the lines in one SQL
statement (the rollup trigger runs as for any insert), serves the Costs service on a loopback
port and times GetCostSummary over gRPC. The scratch database is dropped afterwards.
"""

import argparse
import asyncio
import os
import secrets
import statistics
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
from costs.v1 import costs_pb2, costs_pb2_grpc
from google.protobuf import timestamp_pb2

from services.costs.service import costs_definition
from services.runtime.server import start_service
from services.runtime.settings import Settings

# Each line costs one ten-millionth of a dollar: 1M tokens of Flash-Lite input at $0.10.
SYNTHETIC_LINE_COST = Decimal("0.0000001")


async def insert_synthetic_lines(
    connection: asyncpg.Connection, profile_id: str, count: int, month_start: datetime
) -> None:
    """`count` priced lines spread evenly over the 30 days from month_start, 200 per job.

    Written as the schema owner in one statement, the fastest way to a large history.
    """
    await connection.execute(
        """
        INSERT INTO costs.entries (profile_id, request_id, provider, model, job_id, occurred_at,
            usage, cost_usd, priced)
        SELECT $1, 'synthetic-' || n, 'gemini', 'gemini-2.5-flash-lite',
               ('00000000-0000-4000-8000-' || lpad((n / 200)::text, 12, '0'))::uuid,
               $2::timestamptz + n * (interval '30 days' / $3::integer),
               '{"prompt_tokens": "1"}', $4, true
        FROM generate_series(0, $3::integer - 1) AS n
        """,
        profile_id,
        month_start,
        count,
        SYNTHETIC_LINE_COST,
    )
    await connection.execute("ANALYZE costs.entries, costs.daily_costs")


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


async def run(database_url: str, lines: int, calls: int) -> None:
    name = f"costs_benchmark_{secrets.token_hex(4)}"
    scratch_url = urlunsplit(urlsplit(database_url)._replace(path=f"/{name}"))
    admin = await asyncpg.connect(database_url)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        with tempfile.TemporaryDirectory() as spool_folder:
            definition = costs_definition(spool_path=Path(spool_folder) / "spool.jsonl")
            service = await start_service(
                definition, Settings(database_url=scratch_url, host="127.0.0.1", port=0)
            )
            try:
                await _measure(service.port, scratch_url, lines, calls)
            finally:
                await service.stop(grace=1)
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def _measure(port: int, database_url: str, lines: int, calls: int) -> None:
    month = datetime(2025, 5, 1, tzinfo=UTC)
    connection = await asyncpg.connect(database_url)
    started = time.perf_counter()
    await insert_synthetic_lines(connection, "benchmark", lines, month)
    await connection.close()
    print(f"wrote {lines:,} lines in {time.perf_counter() - started:.1f} s")
    request = costs_pb2.GetCostSummaryRequest(
        start_time=_timestamp(month),
        end_time=_timestamp(datetime(2025, 6, 1, tzinfo=UTC)),
        group_by=[costs_pb2.MODEL, costs_pb2.DAY],
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = costs_pb2_grpc.CostServiceStub(channel)
        metadata = (("x-profile-id", "benchmark"),)
        summary = await stub.GetCostSummary(request, metadata=metadata)
        durations = []
        for _ in range(calls):
            started = time.perf_counter()
            await stub.GetCostSummary(request, metadata=metadata)
            durations.append((time.perf_counter() - started) * 1000)
    durations.sort()
    print(
        f"GetCostSummary, May 2025 by model and day, {calls} calls: "
        f"median {statistics.median(durations):.1f} ms, "
        f"p95 {durations[int(len(durations) * 0.95) - 1]:.1f} ms, max {durations[-1]:.1f} ms; "
        f"total {summary.total_cost_usd} USD over {sum(r.line_count for r in summary.rows):,} lines"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.costs.benchmark")
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    database_url = os.environ.get("DATABASE_URL")
    if not database_url:
        raise SystemExit("DATABASE_URL is required: the server the scratch database is made on")
    asyncio.run(run(database_url, args.lines, args.calls))


if __name__ == "__main__":
    main()
