"""gRPC's own limits, as the settings configure them: calls in flight per server process
(beyond: RESOURCE_EXHAUSTED from gRPC itself) and streams per HTTP/2 connection (beyond: the
call waits in the client for a stream of that connection to end)."""

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from services.jobs.service import JOBS
from tests.conftest import as_profile, new_profile_id, running, settings_for

Code = grpc.StatusCode


def _channel(port: int) -> grpc.aio.Channel:
    """A channel with a connection of its own."""
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
    )


@asynccontextmanager
async def watching(port: int, streams: int) -> AsyncIterator[jobs_pb2_grpc.JobServiceStub]:
    """`streams` WatchJob calls open on one connection; its stub."""
    profile = as_profile(new_profile_id())
    async with _channel(port) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        job = await stub.CreateJob(
            jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k")), metadata=profile
        )
        watches = [
            stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=profile)
            for _ in range(streams)
        ]
        for watch in watches:
            await watch.read()
        try:
            yield stub
        finally:
            for watch in watches:
                watch.cancel()


async def _status_of_get(
    stub: jobs_pb2_grpc.JobServiceStub, deadline: float
) -> grpc.aio.AioRpcError:
    """How a GetJob of a job that does not exist ends (NOT_FOUND when it is served)."""
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await stub.GetJob(
            jobs_pb2.GetJobRequest(job_id=str(uuid.uuid4())),
            metadata=as_profile(new_profile_id()),
            timeout=deadline,
        )
    return ended.value


async def test_calls_beyond_the_servers_limit_are_refused_by_grpc(database_url):
    settings = settings_for(database_url, grpc_max_concurrent_rpcs=2)
    async with running(JOBS, settings) as service, watching(service.port, 2) as stub:
        refused = await _status_of_get(stub, deadline=10)
    assert refused.code() == Code.RESOURCE_EXHAUSTED
    assert refused.details() == "Concurrent RPC limit exceeded!"


async def test_streams_beyond_a_connections_limit_wait_in_the_client(database_url):
    settings = settings_for(database_url, grpc_max_concurrent_streams=1)
    async with (
        running(JOBS, settings) as service,
        watching(service.port, 1) as crowded,
        _channel(service.port) as other,
    ):
        waited = await _status_of_get(crowded, deadline=0.5)
        served = await _status_of_get(jobs_pb2_grpc.JobServiceStub(other), deadline=10)
    assert waited.code() == Code.DEADLINE_EXCEEDED
    assert served.code() == Code.NOT_FOUND
