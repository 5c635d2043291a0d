"""JOBS_RETENTION_DAYS: finished jobs past the retention are deleted in batches by a sweep that
every replica runs; jobs still pending or processing, and recent ones, are kept.

The jobs made here are backdated to the last century, and the sweeps asked to delete only
jobs older than that, so no other test's jobs are touched.
"""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import grpc
import pytest
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from services.jobs.retention import RetentionPolicy
from services.jobs.service import jobs_definition
from tests.conftest import as_profile, new_profile_id, running, settings_for

Code = grpc.StatusCode

# Jobs are backdated to LONG_AGO; a sweep deletes what is older than CUTOFF.
LONG_AGO = datetime(1990, 1, 1, tzinfo=UTC)
CUTOFF = datetime(2000, 1, 1, tzinfo=UTC)
# A retention that reaches back to before CUTOFF only: about 30 years.
DAYS = (datetime.now(UTC) - CUTOFF).days


@pytest.fixture(scope="module")
async def stub(database_url: str) -> AsyncIterator[jobs_pb2_grpc.JobServiceStub]:
    async with (
        running(jobs_definition(), settings_for(database_url)) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        yield jobs_pb2_grpc.JobServiceStub(channel)


async def make_jobs(
    stub: jobs_pb2_grpc.JobServiceStub, profile_id: str, count: int, kind: str = "render"
) -> list[str]:
    return [
        (
            await stub.CreateJob(
                jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind=kind)),
                metadata=as_profile(profile_id),
            )
        ).job_id
        for _ in range(count)
    ]


async def as_owner(database_url: str, query: str, *arguments: object) -> object:
    """A statement as the schema's owner, who sees time pass: the test's way to age jobs."""
    connection = await asyncpg.connect(database_url)
    try:
        return await connection.fetchval(query, *arguments)
    finally:
        await connection.close()


async def age(database_url: str, job_ids: list[str], status: str, when: datetime) -> None:
    await as_owner(
        database_url,
        "UPDATE jobs.jobs SET status = $2, update_time = $3 WHERE job_id = ANY($1::uuid[])",
        [uuid.UUID(job_id) for job_id in job_ids],
        status,
        when,
    )


async def exists(stub: jobs_pb2_grpc.JobServiceStub, profile_id: str, job_id: str) -> bool:
    try:
        await stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), metadata=as_profile(profile_id))
    except grpc.aio.AioRpcError as error:
        if error.code() != Code.NOT_FOUND:
            raise
        return False
    return True


async def sweep(database_url: str, limit: int) -> int:
    return await as_owner(database_url, "SELECT jobs.delete_finished_jobs($1, $2)", CUTOFF, limit)


async def test_only_finished_jobs_past_the_retention_are_deleted(database_url, stub):
    first, second = new_profile_id(), new_profile_id()
    completed, failed, cancelled = [await make_jobs(stub, first, 1) for _ in range(3)]
    others_old = await make_jobs(stub, second, 2)
    pending_old, processing_old, recent_done = [await make_jobs(stub, first, 1) for _ in range(3)]
    await age(database_url, completed, "COMPLETED", LONG_AGO)
    await age(database_url, failed, "FAILED", LONG_AGO)
    await age(database_url, cancelled, "CANCELLED", LONG_AGO)
    await age(database_url, others_old, "COMPLETED", LONG_AGO)
    await age(database_url, pending_old, "PENDING", LONG_AGO)
    await age(database_url, processing_old, "PROCESSING", LONG_AGO)
    await age(database_url, recent_done, "COMPLETED", datetime(2001, 1, 1, tzinfo=UTC))

    assert await sweep(database_url, 500) == 5

    for job_id in completed + failed + cancelled:
        assert not await exists(stub, first, job_id)
    for job_id in others_old:
        assert not await exists(stub, second, job_id)
    for job_id in pending_old + processing_old + recent_done:
        assert await exists(stub, first, job_id)
    assert await sweep(database_url, 500) == 0


async def test_sweeps_running_at_once_delete_each_job_once_in_batches(database_url, stub):
    profile_id = new_profile_id()
    job_ids = await make_jobs(stub, profile_id, 40)
    await age(database_url, job_ids, "COMPLETED", LONG_AGO)

    deleted = await asyncio.gather(*(sweep(database_url, 7) for _ in range(4)))

    assert all(count <= 7 for count in deleted)
    left = 40 - sum(deleted)
    while left:  # the batches left, as the sweep works off a backlog
        done = await sweep(database_url, 7)
        assert done
        left -= done
    assert await sweep(database_url, 7) == 0
    assert not any([await exists(stub, profile_id, job_id) for job_id in job_ids])


async def test_the_retention_read_sees_nothing_outside_the_sweep(database_url, stub):
    """The policy that lets the sweep see every profile's finished jobs is off for a
    profile's own statements: its scope sees only its jobs."""
    mine, theirs = new_profile_id(), new_profile_id()
    await age(database_url, await make_jobs(stub, mine, 1), "COMPLETED", LONG_AGO)
    await age(database_url, await make_jobs(stub, theirs, 1), "COMPLETED", LONG_AGO)
    connection = await asyncpg.connect(database_url)
    try:
        async with connection.transaction():
            await connection.execute(
                "SELECT set_config('role', 'jobs_service', true), "
                "set_config('app.profile_id', $1, true)",
                mine,
            )
            seen = await connection.fetch(
                "SELECT DISTINCT profile_id FROM jobs.jobs WHERE update_time < $1", CUTOFF
            )
    finally:
        await connection.close()
    assert [row["profile_id"] for row in seen] == [mine]
    await sweep(database_url, 500)


class SweepHeard(logging.Handler):
    """Sets `done` when a retention sweep logs that it deleted jobs."""

    def __init__(self) -> None:
        super().__init__()
        self.done = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("retention sweep: "):
            self.done.set()


async def test_a_replica_with_a_retention_deletes_old_finished_jobs(database_url, stub):
    profile_id = new_profile_id()
    old, kept = await make_jobs(stub, profile_id, 2)
    await age(database_url, [old], "COMPLETED", LONG_AGO)
    heard = SweepHeard()
    sweeps_log = logging.getLogger("services.jobs.sweeps")
    sweeps_log.addHandler(heard)
    policy = RetentionPolicy(days=DAYS, sweep_seconds=0.05, sweep_batch=10)
    try:
        async with running(jobs_definition(retention_policy=policy), settings_for(database_url)):
            async with asyncio.timeout(10):
                await heard.done.wait()
    finally:
        sweeps_log.removeHandler(heard)
    assert not await exists(stub, profile_id, old)
    assert await exists(stub, profile_id, kept)


def test_the_retention_comes_from_the_environment_and_is_off_by_default(monkeypatch):
    assert RetentionPolicy.from_environment().days == 0
    monkeypatch.setenv("JOBS_RETENTION_DAYS", "30")
    monkeypatch.setenv("JOBS_RETENTION_SWEEP_SECONDS", "60")
    policy = RetentionPolicy.from_environment()
    assert (policy.days, policy.sweep_seconds, policy.sweep_batch) == (30, 60, 500)
    monkeypatch.setenv("JOBS_RETENTION_DAYS", "-1")
    with pytest.raises(SystemExit, match="JOBS_RETENTION_DAYS"):
        RetentionPolicy.from_environment()
