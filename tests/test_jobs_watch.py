"""WatchJob: the current state, then every change, from any replica, over one listener."""

import asyncio

import grpc
import pytest
from google.protobuf import field_mask_pb2
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from services.jobs.service import JOBS
from tests.conftest import running, settings_for

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
