"""Timestamps at either end of their range (0001-01-01 and 9999-12-31T23:59:59.999999999) in
every RPC that takes one: answered like any other time, never INTERNAL from date arithmetic
that overflows (a day added to the last day, a window around the first instant)."""

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from costs.v1 import costs_pb2
from google.protobuf import timestamp_pb2
from jobs.v1 import jobs_pb2
from publisher.v1 import publisher_pb2

from services.costs.model import TimeRange
from services.runtime.fields import MAX_TIME, MIN_TIME, shifted_time
from tests.conftest import expect_status
from tests.publisher_requests import post_request
from tests.test_publisher_publish_job import completed_job, publish_request

Code = grpc.StatusCode
FIRST = timestamp_pb2.Timestamp(seconds=-62_135_596_800)
LAST = timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_999)


def _seconds_after(stamp: timestamp_pb2.Timestamp, seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=stamp.seconds + seconds)


def _summary(start, end) -> costs_pb2.GetCostSummaryRequest:
    return costs_pb2.GetCostSummaryRequest(
        start_time=start,
        end_time=end,
        group_by=[costs_pb2.DAY, costs_pb2.MONTH, costs_pb2.PROVIDER],
    )


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (FIRST, LAST),
        (_seconds_after(LAST, -10), LAST),
        (_seconds_after(LAST, -40 * 86_400), LAST),
        (FIRST, _seconds_after(FIRST, 10)),
    ],
    ids=["whole_range", "last_seconds", "last_forty_days", "first_seconds"],
)
async def test_cost_summary_at_the_ends_of_time_is_answered(costs_stub, profile, start, end):
    summary = await costs_stub.GetCostSummary(_summary(start, end), metadata=profile)
    assert summary.total_cost_usd == "0"


async def test_cost_recorded_at_the_first_instant_is_summarised_and_listed(costs_stub, profile):
    request = costs_pb2.RecordElevenLabsTTSRequest(
        request_id="r", model_id="eleven_flash_v2_5", characters=1000, occurred_at=FIRST
    )
    entry = (await costs_stub.RecordElevenLabsTTS(request, metadata=profile)).entry
    summary = await costs_stub.GetCostSummary(_summary(FIRST, LAST), metadata=profile)
    listed = await costs_stub.ListCostEntries(
        costs_pb2.ListCostEntriesRequest(start_time=FIRST, end_time=LAST), metadata=profile
    )
    assert not entry.priced  # no catalog price was in effect then
    assert [row.day for row in summary.unpriced_rows] == ["0001-01-01"]
    assert [e.entry_id for e in listed.entries] == [entry.entry_id]


@pytest.mark.parametrize(
    "request_of",
    [
        lambda t: costs_pb2.RecordGeminiUsageRequest(
            request_id="g", model="gemini-2.5-flash", prompt_tokens=1, occurred_at=t
        ),
        lambda t: costs_pb2.RecordUsageRequest(
            request_id="u", provider="acme", model="m", unit="s", quantity="1", occurred_at=t
        ),
    ],
    ids=["RecordGeminiUsage", "RecordUsage"],
)
async def test_usage_recorded_at_the_first_instant_is_stored(costs_stub, profile, request_of):
    rpc = type(request_of(FIRST)).__name__.removesuffix("Request")
    response = await getattr(costs_stub, rpc)(request_of(FIRST), metadata=profile)
    assert response.entry.occurred_at == FIRST


async def test_streamed_line_at_the_first_instant_is_stored(costs_stub, profile):
    line = costs_pb2.UsageLine(
        usage=costs_pb2.RecordUsageRequest(
            request_id="s", provider="acme", model="m", unit="s", quantity="1", occurred_at=FIRST
        )
    )
    response = await costs_stub.StreamUsage(
        iter([costs_pb2.StreamUsageRequest(lines=[line])]), metadata=profile
    )
    assert response.accepted == 1


async def test_usage_at_the_last_instant_is_refused_as_in_the_future(costs_stub, profile):
    request = costs_pb2.RecordElevenLabsTTSRequest(
        request_id="r", model_id="eleven_flash_v2_5", characters=1, occurred_at=LAST
    )
    details = await expect_status(
        costs_stub.RecordElevenLabsTTS(request, metadata=profile), Code.INVALID_ARGUMENT
    )
    assert "in the future" in details


async def test_cost_entries_between_the_ends_of_time_are_listed(costs_stub, profile):
    listed = await costs_stub.ListCostEntries(
        costs_pb2.ListCostEntriesRequest(start_time=FIRST, end_time=LAST), metadata=profile
    )
    assert list(listed.entries) == []


async def test_jobs_created_between_the_ends_of_time_are_listed(jobs_stub, profile):
    job = await jobs_stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k")), metadata=profile
    )
    listed = await jobs_stub.ListJobs(
        jobs_pb2.ListJobsRequest(create_time_start=FIRST, create_time_end=LAST), metadata=profile
    )
    assert [j.job_id for j in listed.jobs] == [job.job_id]


async def test_posts_between_the_ends_of_time_are_listed(publisher_stub, postiz_profile):
    listed = await publisher_stub.ListPosts(
        publisher_pb2.ListPostsRequest(start_time=FIRST, end_time=LAST),
        metadata=postiz_profile.metadata,
    )
    assert list(listed.posts) == []


async def test_post_searched_between_the_ends_of_time_is_not_found(publisher_stub, postiz_profile):
    request = publisher_pb2.GetPostRequest(post_id="nope", start_time=FIRST, end_time=LAST)
    await expect_status(
        publisher_stub.GetPost(request, metadata=postiz_profile.metadata), Code.NOT_FOUND
    )


@pytest.mark.parametrize("when", [MIN_TIME, MAX_TIME], ids=["first_instant", "last_instant"])
async def test_post_scheduled_at_an_end_of_time_is_found_by_its_id_alone(
    publisher_stub, postiz_profile, when
):
    """GetPost without a window searches a day either side of the publish time: held within
    the range instead of overflowing."""
    request = post_request(postiz_profile, publish_time=when)
    publication = await publisher_stub.CreatePost(request, metadata=postiz_profile.metadata)
    post_id = publication.posts[0].post_id
    post = await publisher_stub.GetPost(
        publisher_pb2.GetPostRequest(post_id=post_id), metadata=postiz_profile.metadata
    )
    assert post.id == post_id


async def test_job_published_for_the_last_instant_is_scheduled_then(
    jobs_stub, publisher_stub, fake_postiz, postiz_profile
):
    fake_postiz.files["late.mp4"] = b"\x00\x00\x00\x18ftypmp42" + bytes(100)
    job = await completed_job(
        jobs_stub, postiz_profile.metadata, video_url=f"{fake_postiz.base_url}/files/late.mp4"
    )
    request = publish_request(job, postiz_profile)
    request.publish_time.CopyFrom(LAST)
    publication = await publisher_stub.PublishJob(request, metadata=postiz_profile.metadata)
    assert publication.publish_time.seconds == LAST.seconds


@pytest.mark.parametrize(
    ("moment", "delta", "expected"),
    [
        (MAX_TIME - timedelta(hours=1), timedelta(days=1), MAX_TIME),
        (MIN_TIME + timedelta(hours=1), -timedelta(days=1), MIN_TIME),
        (MAX_TIME - timedelta(days=2), timedelta(days=1), MAX_TIME - timedelta(days=1)),
        (MIN_TIME, timedelta(minutes=5), MIN_TIME + timedelta(minutes=5)),
    ],
    ids=["past_the_last", "before_the_first", "within_at_the_end", "within_at_the_start"],
)
def test_a_shifted_time_is_held_within_the_timestamp_range(moment, delta, expected):
    assert shifted_time(moment, delta) == expected


def test_a_time_range_within_the_last_day_has_no_whole_day():
    time_range = TimeRange(datetime(9999, 12, 31, 12, tzinfo=UTC), MAX_TIME)
    assert time_range.edges == ((time_range.start, MAX_TIME), (MAX_TIME, MAX_TIME))
