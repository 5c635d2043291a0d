"""jobs.v1.JobService: each RPC's behaviour and its answers to bad input."""

import asyncio
import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2
from jobs.v1 import jobs_pb2

from tests.conftest import as_profile, new_profile_id

Code = grpc.StatusCode


def _struct(**values: object) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


async def create(stub, profile, kind: str = "video_render", **data: object) -> jobs_pb2.Job:
    request = jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind=kind, data=_struct(**data)))
    return await stub.CreateJob(request, metadata=profile)


async def update(stub, profile, job: jobs_pb2.Job, *paths: str) -> jobs_pb2.Job:
    mask = field_mask_pb2.FieldMask(paths=list(paths))
    return await stub.UpdateJob(
        jobs_pb2.UpdateJobRequest(job=job, update_mask=mask), metadata=profile
    )


async def expect_status(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code, raised.value.details()
    return raised.value.details()


async def test_create_job_returns_a_pending_job_owned_by_the_caller(jobs_stub, profile):
    job = await create(jobs_stub, profile, product="sku-1")
    assert uuid.UUID(job.job_id)
    assert job.profile_id == profile[0][1]
    assert job.status == jobs_pb2.PENDING
    assert job.progress == 0
    assert dict(job.data) == {"product": "sku-1"}
    assert job.create_time.seconds > 0
    assert job.etag


async def test_create_job_with_the_same_request_id_returns_the_same_job(jobs_stub, profile):
    request = jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="render"), request_id="req-1")
    first, second = await asyncio.gather(
        jobs_stub.CreateJob(request, metadata=profile),
        jobs_stub.CreateJob(request, metadata=profile),
    )
    third = await jobs_stub.CreateJob(request, metadata=profile)
    assert first.job_id == second.job_id == third.job_id
    listed = await jobs_stub.ListJobs(jobs_pb2.ListJobsRequest(), metadata=profile)
    assert len(listed.jobs) == 1


async def test_same_request_id_in_two_profiles_creates_two_jobs(jobs_stub):
    request = jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="render"), request_id="shared")
    a = await jobs_stub.CreateJob(request, metadata=as_profile(new_profile_id()))
    b = await jobs_stub.CreateJob(request, metadata=as_profile(new_profile_id()))
    assert a.job_id != b.job_id


async def test_create_job_without_kind_is_invalid(jobs_stub, profile):
    details = await expect_status(
        jobs_stub.CreateJob(jobs_pb2.CreateJobRequest(job=jobs_pb2.Job()), metadata=profile),
        Code.INVALID_ARGUMENT,
    )
    assert "job.kind is required" in details


async def test_get_job_returns_what_was_created(jobs_stub, profile):
    created = await create(jobs_stub, profile, n=1)
    fetched = await jobs_stub.GetJob(
        jobs_pb2.GetJobRequest(job_id=created.job_id), metadata=profile
    )
    assert fetched == created


@pytest.mark.parametrize("job_id", ["", "not-a-uuid", "123"])
async def test_get_job_with_malformed_id_is_invalid(jobs_stub, profile, job_id):
    await expect_status(
        jobs_stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), metadata=profile),
        Code.INVALID_ARGUMENT,
    )


async def test_get_job_that_does_not_exist_is_not_found(jobs_stub, profile):
    details = await expect_status(
        jobs_stub.GetJob(jobs_pb2.GetJobRequest(job_id=str(uuid.uuid4())), metadata=profile),
        Code.NOT_FOUND,
    )
    assert "not found" in details


async def test_update_job_changes_only_the_masked_fields(jobs_stub, profile):
    job = await create(jobs_stub, profile)
    change = jobs_pb2.Job(job_id=job.job_id, status=jobs_pb2.PROCESSING, progress=40, message="x")
    updated = await update(jobs_stub, profile, change, "status", "progress")
    assert updated.status == jobs_pb2.PROCESSING
    assert updated.progress == 40
    assert updated.message == ""
    assert updated.etag != job.etag
    assert updated.update_time.ToDatetime() > job.update_time.ToDatetime()


async def test_update_job_with_stale_etag_is_aborted_and_changes_nothing(jobs_stub, profile):
    job = await create(jobs_stub, profile)
    await update(jobs_stub, profile, jobs_pb2.Job(job_id=job.job_id, progress=10), "progress")
    stale = jobs_pb2.Job(job_id=job.job_id, progress=90, etag=job.etag)
    await expect_status(update(jobs_stub, profile, stale, "progress"), Code.ABORTED)
    current = await jobs_stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=profile)
    assert current.progress == 10


async def test_update_job_with_matching_etag_succeeds(jobs_stub, profile):
    job = await create(jobs_stub, profile)
    fresh = jobs_pb2.Job(job_id=job.job_id, progress=5, etag=job.etag)
    assert (await update(jobs_stub, profile, fresh, "progress")).progress == 5


@pytest.mark.parametrize("progress", [-1, 101])
async def test_update_job_with_progress_out_of_range_is_invalid(jobs_stub, profile, progress):
    job = await create(jobs_stub, profile)
    change = jobs_pb2.Job(job_id=job.job_id, progress=progress)
    details = await expect_status(
        update(jobs_stub, profile, change, "progress"), Code.INVALID_ARGUMENT
    )
    assert "between 0 and 100" in details


async def test_update_job_without_mask_or_with_unknown_path_is_invalid(jobs_stub, profile):
    job = await create(jobs_stub, profile)
    change = jobs_pb2.Job(job_id=job.job_id, kind="other")
    assert "update_mask is required" in await expect_status(
        update(jobs_stub, profile, change), Code.INVALID_ARGUMENT
    )
    assert "kind" in await expect_status(
        update(jobs_stub, profile, change, "kind"), Code.INVALID_ARGUMENT
    )


@pytest.mark.parametrize(
    ("path", "final"),
    [
        ([jobs_pb2.PROCESSING, jobs_pb2.COMPLETED], jobs_pb2.COMPLETED),
        ([jobs_pb2.PROCESSING, jobs_pb2.FAILED], jobs_pb2.FAILED),
        ([jobs_pb2.COMPLETED], jobs_pb2.COMPLETED),
        ([jobs_pb2.PROCESSING, jobs_pb2.CANCELLED], jobs_pb2.CANCELLED),
    ],
)
async def test_status_moves_forward(jobs_stub, profile, path, final):
    job = await create(jobs_stub, profile)
    for status in path:
        job = await update(
            jobs_stub, profile, jobs_pb2.Job(job_id=job.job_id, status=status), "status"
        )
    assert job.status == final


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ([jobs_pb2.PROCESSING], jobs_pb2.PENDING),
        ([jobs_pb2.COMPLETED], jobs_pb2.PROCESSING),
        ([jobs_pb2.FAILED], jobs_pb2.CANCELLED),
        ([jobs_pb2.CANCELLED], jobs_pb2.PROCESSING),
    ],
)
async def test_illegal_status_move_is_a_failed_precondition(jobs_stub, profile, path, illegal):
    job = await create(jobs_stub, profile)
    for status in path:
        job = await update(
            jobs_stub, profile, jobs_pb2.Job(job_id=job.job_id, status=status), "status"
        )
    change = jobs_pb2.Job(job_id=job.job_id, status=illegal)
    await expect_status(update(jobs_stub, profile, change, "status"), Code.FAILED_PRECONDITION)
    current = await jobs_stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=profile)
    assert current.status == path[-1]


async def test_result_of_a_completed_job_can_still_be_written(jobs_stub, profile):
    job = await create(jobs_stub, profile)
    job = await update(
        jobs_stub, profile, jobs_pb2.Job(job_id=job.job_id, status=jobs_pb2.COMPLETED), "status"
    )
    change = jobs_pb2.Job(job_id=job.job_id, result=_struct(post_ids=["p1"]))
    updated = await update(jobs_stub, profile, change, "result")
    assert list(updated.result["post_ids"]) == ["p1"]


async def test_unspecified_status_is_invalid(jobs_stub, profile):
    job = await create(jobs_stub, profile)
    change = jobs_pb2.Job(job_id=job.job_id)
    await expect_status(update(jobs_stub, profile, change, "status"), Code.INVALID_ARGUMENT)


async def test_cancel_job_cancels_and_is_idempotent(jobs_stub, profile):
    job = await create(jobs_stub, profile)
    request = jobs_pb2.CancelJobRequest(job_id=job.job_id)
    cancelled = await jobs_stub.CancelJob(request, metadata=profile)
    again = await jobs_stub.CancelJob(request, metadata=profile)
    assert cancelled.status == again.status == jobs_pb2.CANCELLED
    assert again.etag == cancelled.etag


async def test_cancel_completed_job_is_a_failed_precondition(jobs_stub, profile):
    job = await create(jobs_stub, profile)
    await update(
        jobs_stub, profile, jobs_pb2.Job(job_id=job.job_id, status=jobs_pb2.COMPLETED), "status"
    )
    await expect_status(
        jobs_stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.job_id), metadata=profile),
        Code.FAILED_PRECONDITION,
    )


async def test_delete_job_removes_it(jobs_stub, profile):
    job = await create(jobs_stub, profile)
    await jobs_stub.DeleteJob(jobs_pb2.DeleteJobRequest(job_id=job.job_id), metadata=profile)
    await expect_status(
        jobs_stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=profile),
        Code.NOT_FOUND,
    )
    await expect_status(
        jobs_stub.DeleteJob(jobs_pb2.DeleteJobRequest(job_id=job.job_id), metadata=profile),
        Code.NOT_FOUND,
    )


async def test_oversized_data_is_invalid_and_nothing_is_stored(jobs_stub, profile):
    request = jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k"))
    request.job.data.update({"blob": "x" * 1_100_000})
    details = await expect_status(
        jobs_stub.CreateJob(request, metadata=profile), Code.INVALID_ARGUMENT
    )
    assert "job.data is larger than" in details
    listed = await jobs_stub.ListJobs(jobs_pb2.ListJobsRequest(), metadata=profile)
    assert list(listed.jobs) == []


async def test_nul_character_in_text_is_invalid(jobs_stub, profile):
    request = jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="render\x00"))
    await expect_status(jobs_stub.CreateJob(request, metadata=profile), Code.INVALID_ARGUMENT)
