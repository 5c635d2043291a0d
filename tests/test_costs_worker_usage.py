"""A pipeline worker's token (scope worker) records usage for the profile of a job it was
given, and for nothing else: Costs asks Jobs whether the worker holds, or held, the lease it
names on the job (AUTH_MODE=jwt, the real services on loopback)."""

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import pytest
from costs.v1 import costs_pb2, costs_pb2_grpc
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from services.costs.service import costs_definition
from tests.conftest import (
    TEST_JWT_SECRET,
    bearer,
    new_profile_id,
    running,
    settings_for,
    signed_in,
    token_for,
)

Code = grpc.StatusCode
WORKER = (bearer(token_for(worker=True)),)


@pytest.fixture(scope="module")
async def costs_stub(
    database_url: str, jwt_jobs_service, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[costs_pb2_grpc.CostServiceStub]:
    definition = costs_definition(
        spool_path=tmp_path_factory.mktemp("worker-costs") / "spool.jsonl",
        spool_retry_seconds=0.1,
        jobs_target=f"127.0.0.1:{jwt_jobs_service.port}",
    )
    settings = settings_for(database_url, auth_mode="jwt", auth_jwt_secret=TEST_JWT_SECRET)
    async with (
        running(definition, settings) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        yield costs_pb2_grpc.CostServiceStub(channel)


async def leased_job(jobs: jobs_pb2_grpc.JobServiceStub, profile_id: str) -> jobs_pb2.Job:
    kind = f"worker-usage-{uuid.uuid4().hex[:12]}"
    await jobs.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind=kind)), metadata=signed_in(profile_id)
    )
    request = jobs_pb2.LeaseJobsRequest(kinds=[kind])
    request.lease_duration.FromTimedelta(timedelta(minutes=5))
    [job] = (await jobs.LeaseJobs(request, metadata=WORKER)).jobs
    return job


def tts(job_id: str = "", lease_id: str = "") -> costs_pb2.RecordElevenLabsTTSRequest:
    return costs_pb2.RecordElevenLabsTTSRequest(
        request_id=f"el-{uuid.uuid4()}",
        job_id=job_id,
        lease_id=lease_id,
        model_id="eleven_multilingual_v2",
        characters=1000,
    )


def as_worker_for(profile_id: str) -> tuple:
    return (("x-profile-id", profile_id), *WORKER)


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


async def test_a_worker_records_usage_for_a_job_it_holds(jwt_jobs_stub, costs_stub):
    profile_id = new_profile_id()
    job = await leased_job(jwt_jobs_stub, profile_id)
    recorded = await costs_stub.RecordElevenLabsTTS(
        tts(job.job_id, job.lease.lease_id), metadata=as_worker_for(profile_id)
    )
    assert recorded.entry.job_id == job.job_id
    assert recorded.entry.cost_usd == "0.1"
    listed = await costs_stub.ListCostEntries(
        costs_pb2.ListCostEntriesRequest(), metadata=signed_in(profile_id)
    )
    assert [entry.request_id for entry in listed.entries] == [recorded.entry.request_id]


async def test_usage_metered_under_a_lease_is_recorded_after_the_job_finished(
    jwt_jobs_stub, costs_stub
):
    """A worker's outbox may deliver late: the lease was granted, that is what counts."""
    profile_id = new_profile_id()
    job = await leased_job(jwt_jobs_stub, profile_id)
    done = jobs_pb2.Job(job_id=job.job_id, status=jobs_pb2.COMPLETED)
    await jwt_jobs_stub.UpdateJob(
        jobs_pb2.UpdateJobRequest(
            job=done, update_mask={"paths": ["status"]}, lease_id=job.lease.lease_id
        ),
        metadata=as_worker_for(profile_id),
    )
    recorded = await costs_stub.RecordElevenLabsTTS(
        tts(job.job_id, job.lease.lease_id), metadata=as_worker_for(profile_id)
    )
    assert recorded.entry.job_id == job.job_id


@pytest.mark.parametrize("missing", ["job_id", "lease_id"])
async def test_a_worker_must_name_the_job_and_its_lease(jwt_jobs_stub, costs_stub, missing):
    profile_id = new_profile_id()
    job = await leased_job(jwt_jobs_stub, profile_id)
    named = {"job_id": job.job_id, "lease_id": job.lease.lease_id} | {missing: ""}
    error = await refused(
        costs_stub.RecordElevenLabsTTS(tts(**named), metadata=as_worker_for(profile_id))
    )
    assert error.code() == Code.PERMISSION_DENIED
    assert "lease_id" in error.details()


async def test_a_lease_on_another_job_or_profile_records_nothing(jwt_jobs_stub, costs_stub):
    profile_id, other = new_profile_id(), new_profile_id()
    job = await leased_job(jwt_jobs_stub, profile_id)
    mine = await leased_job(jwt_jobs_stub, other)
    for request, metadata in (
        (tts(mine.job_id, job.lease.lease_id), as_worker_for(other)),  # another job's lease
        (tts(job.job_id, job.lease.lease_id), as_worker_for(other)),  # another profile's job
        (tts(job.job_id, str(uuid.uuid4())), as_worker_for(profile_id)),  # a lease never given
    ):
        error = await refused(costs_stub.RecordElevenLabsTTS(request, metadata=metadata))
        assert error.code() == Code.PERMISSION_DENIED
    listed = await costs_stub.ListCostEntries(
        costs_pb2.ListCostEntriesRequest(), metadata=signed_in(other)
    )
    assert list(listed.entries) == []


async def test_a_worker_token_reads_no_costs_and_streams_no_usage(costs_stub):
    metadata = as_worker_for(new_profile_id())
    for call in (
        costs_stub.GetCostSummary(costs_pb2.GetCostSummaryRequest(), metadata=metadata),
        costs_stub.StreamUsage(iter([costs_pb2.StreamUsageRequest()]), metadata=metadata),
    ):
        error = await refused(call)
        assert error.code() == Code.PERMISSION_DENIED


async def test_a_workers_usage_waits_for_jobs_to_answer(database_url, tmp_path, jwt_jobs_stub):
    """Costs cannot tell without Jobs: UNAVAILABLE, which a worker's outbox retries."""
    profile_id = new_profile_id()
    job = await leased_job(jwt_jobs_stub, profile_id)
    definition = costs_definition(
        spool_path=tmp_path / "spool.jsonl",
        jobs_target="127.0.0.1:1",  # nothing listens
    )
    settings = settings_for(database_url, auth_mode="jwt", auth_jwt_secret=TEST_JWT_SECRET)
    async with (
        running(definition, settings) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        error = await refused(
            costs_pb2_grpc.CostServiceStub(channel).RecordElevenLabsTTS(
                tts(job.job_id, job.lease.lease_id),
                metadata=as_worker_for(profile_id),
                timeout=10,
            )
        )
    assert error.code() == Code.UNAVAILABLE
