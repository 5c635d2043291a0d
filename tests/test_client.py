"""suite_client: channels that retry UNAVAILABLE, deadlines, profiles and typed exceptions."""

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import grpc
import pytest

import suite_client
from suite_client import jobs_pb2
from tests.conftest import new_profile_id

FAST_RETRY = suite_client.RetryPolicy(max_attempts=3, initial_backoff_seconds=0.01)

Answer = Callable[[int, grpc.aio.ServicerContext], Awaitable[jobs_pb2.Job]]


@asynccontextmanager
async def fake_get_job(answer: Answer) -> AsyncIterator[tuple[str, list[int]]]:
    """A server of jobs.v1.JobService/GetJob alone whose answer to the n-th attempt (from 1)
    is `answer(n, context)`; yields its target and the attempts seen."""
    attempts: list[int] = []

    async def get_job(request: jobs_pb2.GetJobRequest, context) -> jobs_pb2.Job:
        attempts.append(len(attempts) + 1)
        return await answer(attempts[-1], context)

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        get_job,
        request_deserializer=jobs_pb2.GetJobRequest.FromString,
        response_serializer=jobs_pb2.Job.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(suite_client.JOBS_SERVICE, {"GetJob": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", attempts
    finally:
        await server.stop(0)


async def _get(target: str, **options) -> jobs_pb2.Job:
    async with suite_client.jobs_channel(target, **options) as channel:
        return await suite_client.JobServiceStub(channel).GetJob(
            jobs_pb2.GetJobRequest(job_id="j-1"),
            metadata=suite_client.profile_metadata("store-1"),
        )


async def test_a_call_that_first_ends_unavailable_is_retried_and_succeeds():
    async def unavailable_once(attempt: int, context) -> jobs_pb2.Job:
        if attempt == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "replica going away")
        return jobs_pb2.Job(job_id="j-1")

    async with fake_get_job(unavailable_once) as (target, attempts):
        job = await _get(target, retry=FAST_RETRY)
    assert job.job_id == "j-1"
    assert attempts == [1, 2]


async def test_a_call_unavailable_on_every_attempt_raises_unavailable():
    async def always_unavailable(attempt: int, context) -> jobs_pb2.Job:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "down")

    async with fake_get_job(always_unavailable) as (target, attempts):
        with pytest.raises(suite_client.Unavailable) as raised:
            await _get(target, retry=FAST_RETRY)
    assert len(attempts) == FAST_RETRY.max_attempts
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert str(raised.value) == "/jobs.v1.JobService/GetJob answered UNAVAILABLE: down"


async def test_other_failures_are_not_retried():
    async def not_found(attempt: int, context) -> jobs_pb2.Job:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such job")

    async with fake_get_job(not_found) as (target, attempts):
        with pytest.raises(suite_client.NotFound):
            await _get(target, retry=FAST_RETRY)
    assert attempts == [1]


async def test_a_call_without_its_own_deadline_gets_the_channels_default():
    async def never_answers(attempt: int, context) -> jobs_pb2.Job:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async with fake_get_job(never_answers) as (target, _):
        with pytest.raises(suite_client.DeadlineExceeded):
            await _get(target, deadline_seconds=0.2)


@pytest.mark.parametrize(
    ("metadata", "job_id", "error"),
    [
        ((), str(uuid.uuid4()), suite_client.Unauthenticated),
        (suite_client.profile_metadata("bad id"), str(uuid.uuid4()), suite_client.InvalidArgument),
        (suite_client.profile_metadata("store-1"), str(uuid.uuid4()), suite_client.NotFound),
    ],
)
async def test_status_codes_of_the_real_service_become_typed_exceptions(
    jobs_service, metadata, job_id, error
):
    async with suite_client.jobs_channel(f"127.0.0.1:{jobs_service.port}") as channel:
        with pytest.raises(error):
            await suite_client.JobServiceStub(channel).GetJob(
                jobs_pb2.GetJobRequest(job_id=job_id), metadata=metadata
            )


async def test_calls_act_for_the_profile_in_scope_unless_the_call_names_another(jobs_service):
    owner = new_profile_id()
    async with suite_client.jobs_channel(f"127.0.0.1:{jobs_service.port}") as channel:
        jobs = suite_client.JobServiceStub(channel)
        with suite_client.profile_scope(owner):
            job = await jobs.CreateJob(jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="render")))
            assert (await jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id))).kind == "render"
        with pytest.raises(suite_client.NotFound):
            await jobs.GetJob(
                jobs_pb2.GetJobRequest(job_id=job.job_id),
                metadata=suite_client.profile_metadata(new_profile_id()),
            )


async def _answer_ok(attempt: int, context) -> jobs_pb2.Job:
    return jobs_pb2.Job(job_id="j-1")


@asynccontextmanager
async def two_replicas() -> AsyncIterator[tuple[str, list, list]]:
    """Two fake replicas behind one target (as DNS gives a headless service's pods); yields
    it and the attempts each replica saw."""
    async with (
        fake_get_job(_answer_ok) as (one, one_attempts),
        fake_get_job(_answer_ok) as (two, two_attempts),
    ):
        yield f"ipv4:{one},{two}", one_attempts, two_attempts


async def test_calls_are_spread_over_every_replica_of_the_target():
    async with (
        two_replicas() as (target, first, second),
        suite_client.jobs_channel(target) as channel,
    ):
        stub = suite_client.JobServiceStub(channel)
        for _ in range(100):  # round_robin takes a replica once it is connected
            await stub.GetJob(
                jobs_pb2.GetJobRequest(job_id="j-1"),
                metadata=suite_client.profile_metadata("store-1"),
                wait_for_ready=True,
            )
            if first and second:
                break
    assert first
    assert second
