"""`python -m bench.round_trips`: database round trips and statements per call of each hot
operation, counted on the wire (bench/wire_counter.py): figures that do not move with the
machine. The services run in this process against DATABASE_URL (or an embedded server), in a
scratch database, one call at a time.
"""

import os
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import uvloop
from costs.v1 import costs_pb2, costs_pb2_grpc
from google.protobuf import field_mask_pb2
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from bench.wire_counter import WireCounter, counting_proxy
from services.costs.service import costs_definition
from services.jobs.service import JOBS
from services.runtime.embedded_postgres import scratch_database, start_embedded_postgres
from services.runtime.server import migrate, start_service
from services.runtime.settings import Settings

CALLS = 50
PROFILE = (("x-profile-id", "round-trips"),)


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


async def _per_call(counter: WireCounter, call: Callable[[], Awaitable[object]]) -> tuple:
    for _ in range(5):  # connections opened, statements prepared
        await call()
    before = counter.snapshot()
    for _ in range(CALLS):
        await call()
    spent = counter.snapshot() - before
    return spent.round_trips / CALLS, spent.statements / CALLS


async def measure(database_url: str) -> list[Figure]:
    """Each hot operation's round trips and statements per call."""
    async with _suite(database_url) as (counter, jobs_channel, costs_channel):
        jobs = jobs_pb2_grpc.JobServiceStub(jobs_channel)
        costs = costs_pb2_grpc.CostServiceStub(costs_channel)
        created = await jobs.CreateJob(
            jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="render")), metadata=PROFILE
        )

        def create() -> Awaitable[object]:
            request = jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="render"))
            request.job.data.update({"product": "sku-1"})
            return jobs.CreateJob(request, metadata=PROFILE)

        def update() -> Awaitable[object]:
            return jobs.UpdateJob(
                jobs_pb2.UpdateJobRequest(
                    job=jobs_pb2.Job(job_id=created.job_id, progress=50),
                    update_mask=field_mask_pb2.FieldMask(paths=["progress"]),
                ),
                metadata=PROFILE,
            )

        async def cancel() -> None:
            job = await create()
            before = counter.snapshot()
            await jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.job_id), metadata=PROFILE)
            cancelled.append(counter.snapshot() - before)

        def record_tts() -> Awaitable[object]:
            return costs.RecordElevenLabsTTS(
                costs_pb2.RecordElevenLabsTTSRequest(
                    request_id=str(uuid.uuid4()), model_id="eleven_multilingual_v2", characters=900
                ),
                metadata=PROFILE,
            )

        def record_gemini() -> Awaitable[object]:
            return costs.RecordGeminiUsage(
                costs_pb2.RecordGeminiUsageRequest(
                    request_id=str(uuid.uuid4()),
                    model="gemini-2.5-flash",
                    prompt_tokens=1200,
                    output_tokens=300,
                ),
                metadata=PROFILE,
            )

        await costs.SetBudget(
            costs_pb2.SetBudgetRequest(period=costs_pb2.MONTHLY, limit_usd="100"),
            metadata=PROFILE,
        )
        cancelled: list = []
        operations: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("CreateJob", create),
            (
                "GetJob",
                lambda: jobs.GetJob(
                    jobs_pb2.GetJobRequest(job_id=created.job_id), metadata=PROFILE
                ),
            ),
            ("UpdateJob", update),
            ("RecordElevenLabsTTS", record_tts),
            ("RecordGeminiUsage", record_gemini),
            (
                "CheckBudget",
                lambda: costs.CheckBudget(
                    costs_pb2.CheckBudgetRequest(estimated_cost_usd="0.01"), metadata=PROFILE
                ),
            ),
            (
                "GetBudget",
                lambda: costs.GetBudget(
                    costs_pb2.GetBudgetRequest(period=costs_pb2.MONTHLY), metadata=PROFILE
                ),
            ),
        ]
        figures = [Figure(name, *await _per_call(counter, call)) for name, call in operations]
        for _ in range(5):  # statements prepared
            await cancel()
        cancelled.clear()
        for _ in range(CALLS):
            await cancel()
        figures.insert(
            3,
            Figure(
                "CancelJob",
                sum(c.round_trips for c in cancelled) / CALLS,
                sum(c.statements for c in cancelled) / CALLS,
            ),
        )
        return figures


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
