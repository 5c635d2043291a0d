"""ListJobs: newest first, keyset pages, filters, and refusals of bad paging input."""

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from jobs.v1 import jobs_pb2

from tests.conftest import as_profile, new_profile_id


@pytest.fixture
async def seven_jobs(jobs_stub):
    """Seven jobs of a fresh profile, oldest first; kinds alternate a/b; two are PROCESSING."""
    profile = as_profile(new_profile_id())
    jobs = []
    for index in range(7):
        request = jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="ab"[index % 2]))
        jobs.append(await jobs_stub.CreateJob(request, metadata=profile))
    for job in jobs[1:3]:
        change = jobs_pb2.Job(job_id=job.job_id, status=jobs_pb2.PROCESSING)
        mask = field_mask_pb2.FieldMask(paths=["status"])
        await jobs_stub.UpdateJob(
            jobs_pb2.UpdateJobRequest(job=change, update_mask=mask), metadata=profile
        )
    return profile, [job.job_id for job in jobs]


async def _all_pages(stub, profile, **filters) -> list[list[str]]:
    pages, token = [], ""
    while True:
        request = jobs_pb2.ListJobsRequest(page_token=token, **filters)
        reply = await stub.ListJobs(request, metadata=profile)
        pages.append([job.job_id for job in reply.jobs])
        token = reply.next_page_token
        if not token:
            return pages


async def test_pages_walk_every_job_newest_first_without_repeats(jobs_stub, seven_jobs):
    profile, ids = seven_jobs
    pages = await _all_pages(jobs_stub, profile, page_size=3)
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [job_id for page in pages for job_id in page] == ids[::-1]


async def test_default_page_size_is_fifty(jobs_stub):
    profile = as_profile(new_profile_id())
    request = jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k"))
    await asyncio.gather(*(jobs_stub.CreateJob(request, metadata=profile) for _ in range(51)))
    reply = await jobs_stub.ListJobs(jobs_pb2.ListJobsRequest(), metadata=profile)
    assert len(reply.jobs) == 50
    assert reply.next_page_token


async def test_filters_by_status_and_kind(jobs_stub, seven_jobs):
    profile, ids = seven_jobs
    processing = await _all_pages(jobs_stub, profile, statuses=[jobs_pb2.PROCESSING])
    assert processing == [[ids[2], ids[1]]]
    kind_a = await _all_pages(jobs_stub, profile, kind="a", page_size=2)
    assert [i for page in kind_a for i in page] == [ids[6], ids[4], ids[2], ids[0]]


async def test_filters_by_create_time_range(jobs_stub, seven_jobs):
    profile, ids = seven_jobs
    third = await jobs_stub.GetJob(jobs_pb2.GetJobRequest(job_id=ids[2]), metadata=profile)
    sixth = await jobs_stub.GetJob(jobs_pb2.GetJobRequest(job_id=ids[5]), metadata=profile)
    pages = await _all_pages(
        jobs_stub, profile, create_time_start=third.create_time, create_time_end=sixth.create_time
    )
    assert pages == [[ids[4], ids[3], ids[2]]]


async def test_page_size_above_the_maximum_is_capped(jobs_stub, seven_jobs):
    profile, _ = seven_jobs
    reply = await jobs_stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=10_000), metadata=profile)
    assert len(reply.jobs) == 7


async def _refused(stub, profile, request) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.ListJobs(request, metadata=profile)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return raised.value.details()


async def test_negative_page_size_is_invalid(jobs_stub, profile):
    details = await _refused(jobs_stub, profile, jobs_pb2.ListJobsRequest(page_size=-1))
    assert "page_size" in details


async def test_tampered_page_token_is_invalid(jobs_stub, seven_jobs):
    profile, _ = seven_jobs
    first = await jobs_stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=2), metadata=profile)
    token = first.next_page_token
    tampered = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
    for bad in (tampered, "garbage", token[:10]):
        request = jobs_pb2.ListJobsRequest(page_size=2, page_token=bad)
        assert "page_token" in await _refused(jobs_stub, profile, request)


async def test_page_token_reused_with_other_filters_is_invalid(jobs_stub, seven_jobs):
    profile, _ = seven_jobs
    first = await jobs_stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=2), metadata=profile)
    request = jobs_pb2.ListJobsRequest(page_size=2, page_token=first.next_page_token, kind="a")
    assert "other filters" in await _refused(jobs_stub, profile, request)


async def test_unspecified_status_filter_is_invalid(jobs_stub, profile):
    request = jobs_pb2.ListJobsRequest(statuses=[jobs_pb2.JOB_STATUS_UNSPECIFIED])
    assert "statuses" in await _refused(jobs_stub, profile, request)


async def test_empty_time_range_lists_nothing(jobs_stub, seven_jobs):
    profile, _ = seven_jobs
    future = timestamp_pb2.Timestamp()
    future.FromDatetime(datetime.now(UTC) + timedelta(days=1))
    reply = await jobs_stub.ListJobs(
        jobs_pb2.ListJobsRequest(create_time_start=future), metadata=profile
    )
    assert list(reply.jobs) == []
