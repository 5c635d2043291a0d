"""One profile never sees, changes, lists, cancels, deletes or watches another's jobs."""

import grpc
import pytest
from google.protobuf import field_mask_pb2
from jobs.v1 import jobs_pb2

from tests.conftest import as_profile, new_profile_id


@pytest.fixture
async def owner_job(jobs_stub):
    owner = as_profile(new_profile_id())
    request = jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="render"), request_id="r1")
    request.job.data.update({"secret": "owner-only"})
    return owner, await jobs_stub.CreateJob(request, metadata=owner)


def _calls_by_other(stub, job_id: str):
    mask = field_mask_pb2.FieldMask(paths=["progress"])
    return {
        "GetJob": lambda m: stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), metadata=m),
        "UpdateJob": lambda m: stub.UpdateJob(
            jobs_pb2.UpdateJobRequest(
                job=jobs_pb2.Job(job_id=job_id, progress=99), update_mask=mask
            ),
            metadata=m,
        ),
        "CancelJob": lambda m: stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job_id), metadata=m),
        "DeleteJob": lambda m: stub.DeleteJob(jobs_pb2.DeleteJobRequest(job_id=job_id), metadata=m),
    }


@pytest.mark.parametrize("rpc", ["GetJob", "UpdateJob", "CancelJob", "DeleteJob"])
async def test_other_profile_gets_not_found_for_existing_job(jobs_stub, owner_job, rpc):
    owner, job = owner_job
    other = as_profile(new_profile_id())
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _calls_by_other(jobs_stub, job.job_id)[rpc](other)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    unchanged = await jobs_stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=owner)
    assert unchanged == job


async def test_other_profile_cannot_watch_the_job(jobs_stub, owner_job):
    _, job = owner_job
    call = jobs_stub.WatchJob(
        jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=as_profile(new_profile_id())
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pytest.fail("another profile's job was streamed")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_other_profile_lists_none_of_the_jobs(jobs_stub, owner_job):
    owner, job = owner_job
    other = as_profile(new_profile_id())
    assert (await jobs_stub.ListJobs(jobs_pb2.ListJobsRequest(), metadata=other)).jobs == []
    owned = await jobs_stub.ListJobs(jobs_pb2.ListJobsRequest(), metadata=owner)
    assert [j.job_id for j in owned.jobs] == [job.job_id]


async def test_other_profiles_page_token_is_refused(jobs_stub):
    owner = as_profile(new_profile_id())
    for _ in range(3):
        await jobs_stub.CreateJob(
            jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k")), metadata=owner
        )
    page = await jobs_stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=1), metadata=owner)
    request = jobs_pb2.ListJobsRequest(page_size=1, page_token=page.next_page_token)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await jobs_stub.ListJobs(request, metadata=as_profile(new_profile_id()))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_request_id_of_another_profile_does_not_return_its_job(jobs_stub, owner_job):
    _, job = owner_job
    request = jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="render"), request_id="r1")
    mine = await jobs_stub.CreateJob(request, metadata=as_profile(new_profile_id()))
    assert mine.job_id != job.job_id
    assert "secret" not in mine.data


async def test_service_role_without_a_profile_sees_no_rows_in_any_table(jobs_service, owner_job):
    async with jobs_service.pool.pool.acquire() as connection, connection.transaction():
        tables = await connection.fetch(
            "SELECT table_name FROM information_schema.columns "
            "WHERE table_schema = 'jobs' AND column_name = 'profile_id'"
        )
        assert tables
        for table in tables:
            assert await connection.fetchval(f"SELECT count(*) FROM jobs.{table[0]}") > 0
        await connection.execute("SET LOCAL ROLE jobs_service")
        for table in tables:
            assert await connection.fetchval(f"SELECT count(*) FROM jobs.{table[0]}") == 0


async def test_service_role_scoped_to_one_profile_sees_only_its_rows(jobs_service, owner_job):
    owner, job = owner_job
    async with jobs_service.pool.pool.acquire() as connection, connection.transaction():
        await connection.execute("SET LOCAL ROLE jobs_service")
        await connection.execute("SELECT set_config('app.profile_id', $1, true)", owner[0][1])
        rows = await connection.fetch("SELECT profile_id, job_id FROM jobs.jobs")
        assert {str(row["job_id"]) for row in rows} == {job.job_id}


async def test_service_role_cannot_write_a_row_for_another_profile(jobs_service):
    async with jobs_service.pool.pool.acquire() as connection, connection.transaction():
        await connection.execute("SET LOCAL ROLE jobs_service")
        await connection.execute("SELECT set_config('app.profile_id', 'mine', true)")
        with pytest.raises(Exception, match="row-level security"):
            await connection.execute(
                "INSERT INTO jobs.jobs (profile_id, kind) VALUES ('someone-else', 'k')"
            )


async def test_service_role_neither_owns_the_table_nor_bypasses_rls(jobs_service):
    async with jobs_service.pool.pool.acquire() as connection:
        row = await connection.fetchrow(
            """
            SELECT r.rolbypassrls, r.rolsuper, t.tableowner = r.rolname AS owns,
                   c.relrowsecurity, c.relforcerowsecurity
            FROM pg_roles r, pg_tables t
            JOIN pg_class c ON c.relname = t.tablename
            JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = t.schemaname
            WHERE r.rolname = 'jobs_service' AND t.schemaname = 'jobs' AND t.tablename = 'jobs'
            """
        )
    assert dict(row) == {
        "rolbypassrls": False,
        "rolsuper": False,
        "owns": False,
        "relrowsecurity": True,
        "relforcerowsecurity": True,
    }
