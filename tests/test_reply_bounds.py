"""List replies stay under the maximum message size: a page holds fewer rows than page_size
asks when more would not fit, and its next_page_token leads to the rest."""

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import grpc
from costs.v1 import costs_pb2
from google.protobuf import field_mask_pb2, struct_pb2
from jobs.v1 import jobs_pb2
from publisher.v1 import publisher_pb2

from services.jobs.model import Job, JobFilter, JobStatus
from services.jobs.servicer import MAX_KIND_LENGTH, MAX_TEXT_LENGTH, document, job_message
from services.jobs.store import JobStore, list_query
from services.runtime.fields import MAX_STRUCT_BYTES
from services.runtime.paging import reply_budget
from services.runtime.settings import Settings
from tests.conftest import timestamp
from tests.noisy_attacker import retry_delay

MAX_MESSAGE_BYTES = Settings.max_message_bytes
# Nearly the largest Struct the input limits accept.
BIG_STRUCT_BYTES = MAX_STRUCT_BYTES - 1000


def _struct(size: int) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update({"blob": "x" * size})
    return struct


async def _pages(call, request, field: str) -> list[list]:
    """Every page of a list, following next_page_token until it is empty; a page refused for
    the profile's byte rate is asked again after the delay the refusal gives, as a client
    does (pages of megabytes go past PROFILE_BYTES_PER_SECOND)."""
    pages = []
    while True:
        try:
            reply = await call(request)
        except grpc.aio.AioRpcError as error:
            delay = retry_delay(error.trailing_metadata())
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or not delay:
                raise
            await asyncio.sleep(delay)
            continue
        assert reply.ByteSize() <= MAX_MESSAGE_BYTES
        pages.append(list(getattr(reply, field)))
        if not reply.next_page_token:
            return pages
        request.page_token = reply.next_page_token


async def _big_jobs(jobs_stub, profile, count: int) -> list[str]:
    """Jobs whose data and result are each nearly as large as a Struct may be: ~2 MB each."""
    ids = []
    for _ in range(count):
        job = jobs_pb2.Job(kind="render", data=_struct(BIG_STRUCT_BYTES))
        created = await jobs_stub.CreateJob(jobs_pb2.CreateJobRequest(job=job), metadata=profile)
        change = jobs_pb2.Job(job_id=created.job_id, result=_struct(BIG_STRUCT_BYTES))
        await jobs_stub.UpdateJob(
            jobs_pb2.UpdateJobRequest(
                job=change, update_mask=field_mask_pb2.FieldMask(paths=["result"])
            ),
            metadata=profile,
        )
        ids.append(created.job_id)
    return ids


async def test_list_jobs_of_big_jobs_pages_by_bytes_and_reaches_every_job(jobs_stub, profile):
    ids = await _big_jobs(jobs_stub, profile, 5)
    pages = await _pages(
        lambda r: jobs_stub.ListJobs(r, metadata=profile),
        jobs_pb2.ListJobsRequest(page_size=500),
        "jobs",
    )
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [job.job_id for page in pages for job in page] == ids[::-1]


async def test_store_reads_no_more_big_jobs_than_the_byte_budget_holds(
    jobs_service, jobs_stub, profile
):
    await _big_jobs(jobs_stub, profile, 5)
    jobs, more = await JobStore(jobs_service.pool).list(
        profile[0][1], JobFilter(), 500, None, max_bytes=3 * BIG_STRUCT_BYTES
    )
    assert (len(jobs), more) == (2, True)


async def test_first_read_of_a_page_leaves_out_the_values_of_large_jobs(
    jobs_service, jobs_stub, profile
):
    await _big_jobs(jobs_stub, profile, 2)
    query, arguments = list_query(profile[0][1], JobFilter(), 500, None)
    async with jobs_service.pool.transaction(profile[0][1], readonly=True) as connection:
        rows = await connection.fetch(query, *arguments)
    assert [(row["small"], row["data"], row["result"]) for row in rows] == [(False, None, None)] * 2


def test_the_largest_job_the_input_limits_allow_fits_one_reply():
    widest = "\U0001f600" * MAX_TEXT_LENGTH  # four bytes a character
    data = document(_struct(BIG_STRUCT_BYTES), "data")
    now = datetime.now(UTC)
    job = Job(
        job_id=uuid.uuid4(),
        profile_id="p" * 64,
        kind="k" * MAX_KIND_LENGTH,
        status=JobStatus.FAILED,
        progress=100,
        message=widest,
        error=widest,
        data=data,
        result=data,
        create_time=now,
        update_time=now,
        version=2**62,
    )
    reply = jobs_pb2.ListJobsResponse(jobs=[job_message(job)], next_page_token="t" * 200)
    assert reply.ByteSize() <= reply_budget(MAX_MESSAGE_BYTES)


def _usage_line(attributes_bytes: int) -> costs_pb2.UsageLine:
    usage = costs_pb2.RecordUsageRequest(
        request_id=f"req-{uuid.uuid4()}", provider="acme", model="m", unit="calls", quantity="1"
    )
    usage.attributes.update({"note": "x" * attributes_bytes})
    return costs_pb2.UsageLine(usage=usage)


async def test_list_cost_entries_pages_by_bytes_and_reaches_every_entry(costs_stub, profile):
    # 300 lines of 16 KB attributes: 4.8 MB, more than one reply may carry.
    requests = [
        costs_pb2.StreamUsageRequest(lines=[_usage_line(16_000) for _ in range(100)])
        for _ in range(3)
    ]
    await costs_stub.StreamUsage(iter(requests), metadata=profile)
    pages = await _pages(
        lambda r: costs_stub.ListCostEntries(r, metadata=profile),
        costs_pb2.ListCostEntriesRequest(page_size=500),
        "entries",
    )
    assert len(pages) == 2
    assert len({entry.entry_id for page in pages for entry in page}) == 300


async def test_list_posts_pages_by_bytes_and_reaches_every_post(publisher_stub, postiz_profile):
    now = datetime.now(UTC)
    stored = []
    for minutes in range(3):  # posts made in Postiz itself are as large as their author likes
        post = {
            "id": uuid.uuid4().hex,
            "content": "x" * 1_500_000,
            "publishDate": (now - timedelta(minutes=minutes)).isoformat(),
            "releaseURL": None,
            "state": "QUEUE",
            "group": uuid.uuid4().hex,
            "integration": postiz_profile.organization.integrations[0],
            "deletedAt": None,
        }
        postiz_profile.organization.posts.append(post)
        stored.append(post["id"])
    request = publisher_pb2.ListPostsRequest(
        start_time=timestamp(now - timedelta(hours=1)), end_time=timestamp(now + timedelta(hours=1))
    )
    pages = await _pages(
        lambda r: publisher_stub.ListPosts(r, metadata=postiz_profile.metadata), request, "posts"
    )
    assert [len(page) for page in pages] == [2, 1]
    assert [post.id for page in pages for post in page] == stored


async def test_list_posts_pages_by_page_size_newest_first(publisher_stub, postiz_profile):
    now = datetime.now(UTC)
    for minutes in range(5):
        postiz_profile.organization.posts.append(
            {
                "id": f"post-{minutes}",
                "content": "hello",
                "publishDate": (now - timedelta(minutes=minutes)).isoformat(),
                "integration": postiz_profile.organization.integrations[0],
                "deletedAt": None,
            }
        )
    request = publisher_pb2.ListPostsRequest(
        start_time=timestamp(now - timedelta(hours=1)),
        end_time=timestamp(now + timedelta(hours=1)),
        page_size=2,
    )
    pages = await _pages(
        lambda r: publisher_stub.ListPosts(r, metadata=postiz_profile.metadata), request, "posts"
    )
    assert [[post.id for post in page] for page in pages] == [
        ["post-0", "post-1"],
        ["post-2", "post-3"],
        ["post-4"],
    ]


def test_reply_budget_leaves_room_for_the_rest_of_the_reply():
    assert reply_budget(MAX_MESSAGE_BYTES) == MAX_MESSAGE_BYTES - 64 * 1024
