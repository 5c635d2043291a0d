"""WatchJob: the current state, then every change, from any replica, over one listener."""

import asyncio
import contextlib
import uuid

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from jobs.v1 import jobs_pb2, jobs_pb2_grpc
from prometheus_client import REGISTRY

import suite_client
from services.jobs.model import JobChanges, JobStatus
from services.jobs.service import JOBS, jobs_definition
from services.jobs.servicer import job_message
from services.jobs.store import JobStore
from services.jobs.watch import WATCHER_RETRY_SECONDS, JobWatchHub, WatchLimits
from services.runtime.server import start_service
from tests.conftest import as_profile, expect_status, new_profile_id, running, settings_for

TIMEOUT = 10


async def _create(stub, profile) -> jobs_pb2.Job:
    return await stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k")), metadata=profile
    )


async def _set(stub, profile, job_id: str, **fields) -> jobs_pb2.Job:
    request = jobs_pb2.UpdateJobRequest(
        job=jobs_pb2.Job(job_id=job_id, **fields),
        update_mask=field_mask_pb2.FieldMask(paths=list(fields)),
    )
    return await stub.UpdateJob(request, metadata=profile)


async def _next(call) -> jobs_pb2.Job:
    return await asyncio.wait_for(call.read(), TIMEOUT)


async def test_watch_streams_current_state_then_changes_and_ends_after_terminal(jobs_stub, profile):
    job = await _create(jobs_stub, profile)
    call = jobs_stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=profile)
    assert (await _next(call)).status == jobs_pb2.PENDING
    await _set(jobs_stub, profile, job.job_id, status=jobs_pb2.PROCESSING, progress=10)
    seen = await _next(call)
    assert (seen.status, seen.progress) == (jobs_pb2.PROCESSING, 10)
    await _set(jobs_stub, profile, job.job_id, progress=60)
    assert (await _next(call)).progress == 60
    await _set(jobs_stub, profile, job.job_id, status=jobs_pb2.COMPLETED)
    assert (await _next(call)).status == jobs_pb2.COMPLETED
    assert await _next(call) is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_watch_of_a_finished_job_sends_it_once_and_ends(jobs_stub, profile):
    job = await _create(jobs_stub, profile)
    await jobs_stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.job_id), metadata=profile)
    call = jobs_stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=profile)
    assert [j.status async for j in call] == [jobs_pb2.CANCELLED]


async def test_watch_sees_changes_made_through_another_replica(jobs_stub, database_url, profile):
    job = await _create(jobs_stub, profile)
    call = jobs_stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=profile)
    await _next(call)
    async with (
        running(JOBS, settings_for(database_url)) as replica,
        grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel,
    ):
        other_stub = jobs_pb2_grpc.JobServiceStub(channel)
        await _set(other_stub, profile, job.job_id, progress=33)
    assert (await _next(call)).progress == 33
    call.cancel()


async def test_deleting_a_watched_job_ends_the_stream_with_not_found(jobs_stub, profile):
    job = await _create(jobs_stub, profile)
    call = jobs_stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=profile)
    await _next(call)
    await jobs_stub.DeleteJob(jobs_pb2.DeleteJobRequest(job_id=job.job_id), metadata=profile)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _next(call)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def _listener_backends(service) -> list[int]:
    async with service.pool.pool.acquire() as connection:
        rows = await connection.fetch(
            "SELECT pid FROM pg_stat_activity "
            "WHERE application_name = 'jobs-watch' AND datname = current_database()"
        )
    return [row["pid"] for row in rows]


async def test_many_watchers_share_one_listener_connection(jobs_service, jobs_stub, profile):
    job = await _create(jobs_stub, profile)
    before = await _listener_backends(jobs_service)
    calls = [
        jobs_stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=profile)
        for _ in range(50)
    ]
    await asyncio.gather(*(_next(call) for call in calls))
    assert await _listener_backends(jobs_service) == before
    await _set(jobs_stub, profile, job.job_id, progress=5)
    assert {(await _next(call)).progress for call in calls} == {5}
    for call in calls:
        call.cancel()


async def test_watchers_recover_when_the_listener_connection_is_killed(
    database_url, jobs_stub, profile
):
    async with (
        running(JOBS, settings_for(database_url)) as replica,
        grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel,
    ):
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        job = await _create(stub, profile)
        call = stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=profile)
        await _next(call)
        listeners = await _listener_backends(replica)
        async with replica.pool.pool.acquire() as connection:
            await connection.execute(
                "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", listeners
            )
        await _set(jobs_stub, profile, job.job_id, progress=77)
        assert (await _next(call)).progress == 77
        call.cancel()


@contextlib.asynccontextmanager
async def _hub(service, database_url):
    """A watch hub of the test's own beside the service, on the same database."""
    hub = JobWatchHub(database_url, JobStore(service.pool), job_message)
    await hub.start()
    try:
        yield hub
    finally:
        await hub.close()


async def _thousand_messages(database_url: str, job_id: uuid.UUID) -> None:
    """1,000 changes of the job, each its own transaction and notification; without waiting
    for each commit to reach the disk (synchronous_commit off), so that they take a second."""
    connection = await asyncpg.connect(database_url, server_settings={"synchronous_commit": "off"})
    try:
        for number in range(1000):
            await connection.execute(
                "UPDATE jobs.jobs SET message = $2, version = version + 1 WHERE job_id = $1",
                job_id,
                f"step {number}",
            )
    finally:
        await connection.close()


async def test_a_watcher_that_does_not_read_gets_the_latest_state_not_every_change(
    jobs_service, database_url, jobs_stub
):
    profile_id = new_profile_id()
    job = await _create(jobs_stub, as_profile(profile_id))
    job_id = uuid.UUID(job.job_id)
    store = JobStore(jobs_service.pool)
    async with _hub(jobs_service, database_url) as hub:
        idle, reader = hub.watch(profile_id, job_id), hub.watch(profile_id, job_id)
        await anext(idle)
        await anext(reader)
        await _thousand_messages(database_url, job_id)
        completed = JobChanges({"status": JobStatus.COMPLETED})
        final = await store.update(profile_id, job_id, completed, None)
        # The reader ends with the final state; by then the idle watcher's slot holds it.
        assert [r.etag async for r in reader][-1] == final.etag
        assert [(r.etag, r.message) async for r in idle] == [(final.etag, "step 999")]


def _changes_built() -> float:
    return REGISTRY.get_sample_value("jobs_watch_changes_total") or 0.0


async def test_a_change_is_read_and_converted_once_for_all_watchers_of_the_job(jobs_stub, profile):
    job = await _create(jobs_stub, profile)
    calls = [
        jobs_stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=profile)
        for _ in range(20)
    ]
    await asyncio.gather(*(_next(call) for call in calls))
    before = _changes_built()
    await _set(jobs_stub, profile, job.job_id, progress=42)
    assert {(await _next(call)).progress for call in calls} == {42}
    assert _changes_built() - before == 1
    for call in calls:
        call.cancel()


async def test_watchers_of_one_profile_are_capped_per_replica(database_url, profile):
    limits = WatchLimits(per_profile=3, per_replica=100)
    async with (
        running(jobs_definition(limits), settings_for(database_url)) as replica,
        grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel,
    ):
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        job = await _create(stub, profile)
        request = jobs_pb2.WatchJobRequest(job_id=job.job_id)
        calls = [stub.WatchJob(request, metadata=profile) for _ in range(3)]
        await asyncio.gather(*(_next(call) for call in calls))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _next(stub.WatchJob(request, metadata=profile))
        error = suite_client.error_from("/jobs.v1.JobService/WatchJob", refused.value)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3 WatchJob streams" in refused.value.details()
        assert "JOBS_WATCHERS_PER_PROFILE" in refused.value.details()
        # Told when to try again, as every refusal for a profile's share is.
        assert error.retry_after_seconds == WATCHER_RETRY_SECONDS
        other = as_profile(new_profile_id())
        other_job = await _create(stub, other)
        other_call = stub.WatchJob(
            jobs_pb2.WatchJobRequest(job_id=other_job.job_id), metadata=other
        )
        assert (await _next(other_call)).job_id == other_job.job_id
        for call in [*calls, other_call]:
            call.cancel()


async def test_a_watcher_that_ends_frees_its_place_under_the_cap(database_url, profile):
    limits = WatchLimits(per_profile=1, per_replica=100)
    async with (
        running(jobs_definition(limits), settings_for(database_url)) as replica,
        grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel,
    ):
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        job = await _create(stub, profile)
        await stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.job_id), metadata=profile)
        request = jobs_pb2.WatchJobRequest(job_id=job.job_id)
        for _ in range(3):  # a finished job's stream ends at once, releasing its place
            assert [j.status async for j in stub.WatchJob(request, metadata=profile)] == [
                jobs_pb2.CANCELLED
            ]


async def test_watchers_of_a_replica_are_capped_in_all(database_url):
    limits = WatchLimits(per_profile=10, per_replica=2)
    async with (
        running(jobs_definition(limits), settings_for(database_url)) as replica,
        grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel,
    ):
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        profiles = [as_profile(new_profile_id()) for _ in range(3)]
        calls = []
        for metadata in profiles[:2]:
            job = await _create(stub, metadata)
            calls.append(
                stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=metadata)
            )
        await asyncio.gather(*(_next(call) for call in calls))
        job = await _create(stub, profiles[2])
        details = await expect_status(
            _next(stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=profiles[2])),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        assert "JOBS_WATCHERS_PER_REPLICA" in details
        for call in calls:
            call.cancel()


async def test_watch_streams_end_as_shutdown_starts_not_after_the_grace(database_url, profile):
    service = await start_service(JOBS, settings_for(database_url))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        job = await _create(stub, profile)
        call = stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=profile)
        await _next(call)
        stopping = asyncio.create_task(service.stop(grace=600))
        assert await _next(call) is grpc.aio.EOF
        await asyncio.wait_for(stopping, TIMEOUT)
