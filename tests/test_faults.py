"""Faults under load, each bounded in time: what a caller was told succeeded is there
afterwards, and what failed failed with a status it can act on.

Every test records its figures; `make test` prints them under "fault figures" (or run
`.venv/bin/python -m pytest tests/test_faults.py`).
"""

import asyncio
import collections
import contextlib
import uuid
from dataclasses import dataclass, field

import asyncpg
import grpc
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from services.jobs.service import JOBS
from tests.conftest import (
    as_profile,
    new_profile_id,
    running,
    server_process,
    settings_for,
)

Code = grpc.StatusCode
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WORKERS = 8


@dataclass
class JobLoad:
    """Writers creating jobs until told to stop; what they were told, counted."""

    stub: jobs_pb2_grpc.JobServiceStub
    profile: tuple[tuple[str, str], ...]
    acknowledged: list[str] = field(default_factory=list)
    # request_ids of the calls that failed: executed or not, the database tells
    failed_request_ids: list[str] = field(default_factory=list)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    progress: asyncio.Condition = field(default_factory=asyncio.Condition)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def calls(self) -> int:
        return sum(self.statuses.values())

    async def _write(self) -> None:
        while not self.stop.is_set():
            request = jobs_pb2.CreateJobRequest(
                job=jobs_pb2.Job(kind="load"), request_id=str(uuid.uuid4())
            )
            try:
                job = await self.stub.CreateJob(request, metadata=self.profile, timeout=10)
            except grpc.aio.AioRpcError as error:
                self.statuses[error.code().name] += 1
                self.failed_request_ids.append(request.request_id)
                if error.code() not in (Code.UNAVAILABLE, Code.CANCELLED):
                    return  # the test fails on the status; no point hammering
                await asyncio.sleep(0.02)  # a client's backoff before it retries
            else:
                self.statuses["OK"] += 1
                self.acknowledged.append(job.job_id)
            async with self.progress:
                self.progress.notify_all()

    async def until(self, predicate) -> None:
        async with self.progress:
            await asyncio.wait_for(self.progress.wait_for(predicate), 30)

    @contextlib.asynccontextmanager
    async def running(self):
        workers = [asyncio.create_task(self._write()) for _ in range(WORKERS)]
        try:
            yield self
        finally:
            self.stop.set()
            await asyncio.gather(*workers)


async def _health_becomes(updates, status: int) -> None:
    while (await asyncio.wait_for(updates.read(), 20)).status != status:
        pass


async def _stored(database_url: str, column: str, values: list[str]) -> set[str]:
    """Which of the values (job_id or request_id) the jobs table holds."""
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            f"SELECT {column}::text AS v FROM jobs.jobs WHERE {column}::text = ANY($1::text[])",
            values,
        )
    finally:
        await connection.close()
    return {row["v"] for row in rows}


async def test_postgres_restart_under_load_loses_no_acknowledged_write(
    disposable_postgres, fault_figures
):
    settings = settings_for(disposable_postgres.url, health_check_interval_seconds=0.1)
    async with (
        running(JOBS, settings) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        await _health_becomes(health, SERVING)
        load = JobLoad(jobs_pb2_grpc.JobServiceStub(channel), as_profile(new_profile_id()))
        async with load.running():
            await load.until(lambda: len(load.acknowledged) >= 100)
            await asyncio.to_thread(disposable_postgres.stop)
            await _health_becomes(health, NOT_SERVING)
            await load.until(lambda: load.statuses["UNAVAILABLE"] >= 20)
            acknowledged_before_restart = len(load.acknowledged)
            await asyncio.to_thread(disposable_postgres.start)
            await _health_becomes(health, SERVING)
            await load.until(lambda: len(load.acknowledged) >= acknowledged_before_restart + 100)
        health.cancel()
        stored = await _stored(disposable_postgres.url, "job_id", load.acknowledged)
        failed_yet_stored = await _stored(
            disposable_postgres.url, "request_id", load.failed_request_ids
        )
    lost = set(load.acknowledged) - stored
    fault_figures["postgres restart under load"] = {
        "calls": load.calls,
        "faults": 1,
        "unavailable": load.statuses["UNAVAILABLE"],
        "acknowledged_writes": len(load.acknowledged),
        "writes_lost": len(lost),
        # committed as the connection broke: the caller retries with the same request_id
        "unavailable_yet_committed": len(failed_yet_stored),
    }
    assert set(load.statuses) <= {"OK", "UNAVAILABLE"}, load.statuses
    assert not lost


async def _lock_rows(database_url: str, job_ids: list[str]) -> asyncpg.Connection:
    """A connection holding the jobs' row locks, so UpdateJob calls on them wait in flight."""
    connection = await asyncpg.connect(database_url)
    await connection.execute("BEGIN")
    await connection.execute(
        "SELECT 1 FROM jobs.jobs WHERE job_id = ANY($1::uuid[]) FOR UPDATE", job_ids
    )
    return connection


async def _lock_waiters_reach(database_url: str, count: int) -> None:
    """Waits for `count` queries blocked on a lock in the database, polling Postgres (no event
    crosses the process boundary) from a connection of its own: a transaction sees one
    snapshot of pg_stat_activity."""
    connection = await asyncpg.connect(database_url)
    try:
        async with asyncio.timeout(20):
            for _ in range(1000):
                waiting = await connection.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
                if waiting >= count:
                    return
                await asyncio.sleep(0.02)
    finally:
        await connection.close()


def _progress(job_id: str, progress: int) -> jobs_pb2.UpdateJobRequest:
    return jobs_pb2.UpdateJobRequest(
        job=jobs_pb2.Job(job_id=job_id, progress=progress),
        update_mask=field_mask_pb2.FieldMask(paths=["progress"]),
    )


async def test_sigterm_under_load_fails_no_call_in_flight(database_url, fault_figures):
    async with (
        server_process("jobs", database_url, SHUTDOWN_GRACE_SECONDS="20") as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        load = JobLoad(stub, as_profile(new_profile_id()))
        blocked_jobs = [
            (
                await stub.CreateJob(
                    jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k")), metadata=load.profile
                )
            ).job_id
            for _ in range(4)
        ]
        health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        await _health_becomes(health, SERVING)
        lock = await _lock_rows(database_url, blocked_jobs)
        async with load.running():
            updates = [
                asyncio.ensure_future(stub.UpdateJob(_progress(j, 50), metadata=load.profile))
                for j in blocked_jobs
            ]
            await _lock_waiters_reach(database_url, len(blocked_jobs))
            await load.until(lambda: len(load.acknowledged) >= 100)
            server.process.terminate()
            await _health_becomes(health, NOT_SERVING)
            health.cancel()  # an open stream would hold the drain for the whole grace period
            await lock.execute("COMMIT")
            await lock.close()
            updated = await asyncio.wait_for(asyncio.gather(*updates), 20)
            await load.until(lambda: load.statuses["UNAVAILABLE"] > 0)
        exit_code = await asyncio.wait_for(server.process.wait(), 30)
    stored = await _stored(database_url, "job_id", load.acknowledged)
    failed_yet_stored = await _stored(database_url, "request_id", load.failed_request_ids)
    access = [line for line in server.output if "services.access" in line]
    failed_on_server = [line for line in access if " OK " not in line]
    fault_figures["SIGTERM under load"] = {
        "calls": load.calls + len(updates),
        "faults": 1,
        "calls_in_flight_at_sigterm": len(updates),
        "in_flight_failed": sum(1 for job in updated if job.progress != 50),
        "calls_accepted_then_failed": len(failed_on_server),
        "refused_at_shutdown": len(load.failed_request_ids),
        "refused_yet_executed": len(failed_yet_stored),
        "writes_lost": len(set(load.acknowledged) - stored),
    }
    assert exit_code == 0
    assert all(job.progress == 50 for job in updated)
    assert not failed_on_server, failed_on_server
    # A call arriving as the server stops is refused before any handler takes it: UNAVAILABLE,
    # or CANCELLED when gRPC had queued it. Either way it never ran.
    assert set(load.statuses) <= {"OK", "UNAVAILABLE", "CANCELLED"}, load.statuses
    assert not failed_yet_stored
    assert set(load.acknowledged) <= stored
