"""Operator scope: the cross-profile reads (ListAllJobs), and nothing else."""

import logging
import uuid

import asyncpg
import grpc
import pytest
from jobs.v1 import jobs_pb2

from services.runtime.call_context import Caller, profile_scope
from services.runtime.errors import PermissionDenied
from tests.conftest import bearer, new_profile_id, signed_in, token_for

Code = grpc.StatusCode


def operator() -> tuple[tuple[str, str], ...]:
    return (bearer(token_for(operator=True)),)


async def _create(stub, profile_id: str, kind: str) -> jobs_pb2.Job:
    return await stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind=kind)), metadata=signed_in(profile_id)
    )


async def _all_of_kind(stub, kind: str, metadata, page_size: int = 0) -> list[jobs_pb2.Job]:
    jobs, token = [], ""
    while True:
        page = await stub.ListAllJobs(
            jobs_pb2.ListJobsRequest(kind=kind, page_size=page_size, page_token=token),
            metadata=metadata,
        )
        jobs.extend(page.jobs)
        if not page.next_page_token:
            return jobs
        token = page.next_page_token


async def test_operator_lists_the_jobs_of_every_profile(jwt_jobs_stub):
    kind = f"audit-{uuid.uuid4().hex[:8]}"
    profiles = [new_profile_id() for _ in range(3)]
    created = [await _create(jwt_jobs_stub, p, kind) for p in profiles for _ in range(2)]
    listed = await _all_of_kind(jwt_jobs_stub, kind, operator(), page_size=4)
    assert [j.job_id for j in listed] == [j.job_id for j in reversed(created)]
    assert {j.profile_id for j in listed} == set(profiles)


async def test_cross_profile_read_ignores_x_profile_id(jwt_jobs_stub):
    kind = f"audit-{uuid.uuid4().hex[:8]}"
    await _create(jwt_jobs_stub, new_profile_id(), kind)
    metadata = (*operator(), ("x-profile-id", new_profile_id()))
    assert len(await _all_of_kind(jwt_jobs_stub, kind, metadata)) == 1


async def test_profile_token_cannot_list_all_jobs(jwt_jobs_stub):
    profile_id = new_profile_id()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await jwt_jobs_stub.ListAllJobs(jobs_pb2.ListJobsRequest(), metadata=signed_in(profile_id))
    assert raised.value.code() == Code.PERMISSION_DENIED
    assert "operator" in raised.value.details()


async def test_list_all_jobs_without_a_token_is_unauthenticated(jwt_jobs_stub):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await jwt_jobs_stub.ListAllJobs(jobs_pb2.ListJobsRequest())
    assert raised.value.code() == Code.UNAUTHENTICATED


@pytest.mark.parametrize("method", ["CreateJob", "GetJob", "ListJobs", "DeleteJob"])
async def test_operator_token_can_call_nothing_but_the_cross_profile_reads(jwt_jobs_stub, method):
    profile_id = new_profile_id()
    token = token_for(profile_id, operator=True)
    requests = {
        "CreateJob": jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k")),
        "GetJob": jobs_pb2.GetJobRequest(job_id=str(uuid.uuid4())),
        "ListJobs": jobs_pb2.ListJobsRequest(),
        "DeleteJob": jobs_pb2.DeleteJobRequest(job_id=str(uuid.uuid4())),
    }
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await getattr(jwt_jobs_stub, method)(
            requests[method], metadata=signed_in(profile_id, token)
        )
    assert raised.value.code() == Code.PERMISSION_DENIED


async def test_each_operator_call_is_logged_with_who_made_it(jwt_jobs_stub, caplog):
    caplog.set_level(logging.INFO)
    await jwt_jobs_stub.ListAllJobs(jobs_pb2.ListJobsRequest(page_size=1), metadata=operator())
    assert any(
        r.name == "services.operator"
        and r.getMessage() == "operator test-caller calls /jobs.v1.JobService/ListAllJobs"
        for r in caplog.records
    )


async def test_page_token_of_the_cross_profile_read_is_refused_by_a_profile(jwt_jobs_stub):
    kind = f"audit-{uuid.uuid4().hex[:8]}"
    profile_id = new_profile_id()
    for _ in range(2):
        await _create(jwt_jobs_stub, profile_id, kind)
    page = await jwt_jobs_stub.ListAllJobs(
        jobs_pb2.ListJobsRequest(kind=kind, page_size=1), metadata=operator()
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await jwt_jobs_stub.ListJobs(
            jobs_pb2.ListJobsRequest(kind=kind, page_size=1, page_token=page.next_page_token),
            metadata=signed_in(profile_id),
        )
    assert raised.value.code() == Code.INVALID_ARGUMENT


async def test_cross_profile_transaction_refuses_a_call_without_operator_scope(jwt_jobs_service):
    pool = jwt_jobs_service.pool
    with profile_scope(new_profile_id(), caller=Caller("someone")), pytest.raises(PermissionDenied):
        async with pool.cross_profile_transaction():
            pass


async def test_operator_setting_grants_reads_only_never_writes(jwt_jobs_stub, database_url):
    """Even a transaction that sets app.operator by hand cannot change another profile's job."""
    job = await _create(jwt_jobs_stub, new_profile_id(), "k")
    connection = await asyncpg.connect(database_url)
    try:
        async with connection.transaction():
            await connection.execute(
                "SELECT set_config('role', 'jobs_service', true), "
                "set_config('app.operator', 'on', true)"
            )
            seen = await connection.fetchval(
                "SELECT count(*) FROM jobs.jobs WHERE job_id = $1", uuid.UUID(job.job_id)
            )
            updated = await connection.execute(
                "UPDATE jobs.jobs SET message = 'x' WHERE job_id = $1", uuid.UUID(job.job_id)
            )
            deleted = await connection.execute(
                "DELETE FROM jobs.jobs WHERE job_id = $1", uuid.UUID(job.job_id)
            )
    finally:
        await connection.close()
    assert seen == 1
    assert updated == "UPDATE 0"
    assert deleted == "DELETE 0"


async def test_without_auth_anyone_may_list_all_jobs(jobs_stub):
    """AUTH_MODE=none (local debugging) trusts every caller, here too."""
    reply = await jobs_stub.ListAllJobs(jobs_pb2.ListJobsRequest(page_size=1))
    assert len(reply.jobs) <= 1
