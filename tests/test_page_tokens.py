"""Page tokens carry a row's sort key exactly: a position off by a microsecond would skip or
repeat rows at a page boundary. Only replicas holding the deployment's PAGE_TOKEN_KEY accept
one."""

import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from services.runtime.call_context import profile_scope
from services.runtime.errors import InvalidArgument
from services.runtime.page_tokens import decode_page_token, encode_page_token, page_size
from services.runtime.settings import Settings
from tests.conftest import Metadata, as_profile, new_profile_id, server_process

TIMES = [
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(2026, 11, 25, 10, 47, 1, 999_999, tzinfo=UTC),
    datetime(7109, 4, 23, 17, 47, 31, 79_711, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
]


@pytest.mark.parametrize("moment", TIMES, ids=str)
def test_a_position_round_trips_to_the_microsecond(moment):
    position = (moment, uuid.uuid4())
    with profile_scope("p"):
        assert decode_page_token(encode_page_token(position, ["f"]), ["f"]) == position


def test_microseconds_survive_where_a_float_of_seconds_would_round():
    moment = datetime(7109, 4, 23, 17, 47, 31, 79_711, tzinfo=UTC)
    seconds = (moment - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(seconds=1)
    assert datetime.fromtimestamp(seconds, UTC) != moment  # why the token keeps integers
    with profile_scope("p"):
        decoded, _ = decode_page_token(encode_page_token((moment, uuid.uuid4()), []), [])
    assert decoded == moment


@pytest.mark.parametrize(("requested", "expected"), [(0, 50), (1, 1), (500, 500), (501, 500)])
def test_page_size_defaults_and_caps(requested, expected):
    assert page_size(requested) == expected


def test_negative_page_size_is_refused():
    with pytest.raises(InvalidArgument, match="page_size"):
        page_size(-1)


def test_jwt_mode_stops_at_start_without_a_page_token_key():
    with pytest.raises(SystemExit, match="PAGE_TOKEN_KEY"):
        Settings(database_url="postgresql://x", auth_mode="jwt", auth_jwt_secret="s" * 32)


def test_a_short_page_token_key_stops_the_service_at_start():
    with pytest.raises(SystemExit, match="at least 32 characters"):
        Settings(database_url="postgresql://x", page_token_key="short")


async def _first_page_token(stub: jobs_pb2_grpc.JobServiceStub, profile: Metadata) -> str:
    for _ in range(2):
        await stub.CreateJob(
            jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k")), metadata=profile
        )
    page = await stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=1), metadata=profile)
    assert page.next_page_token
    return page.next_page_token


async def test_a_token_made_by_a_deployment_with_another_key_is_refused(jobs_stub, database_url):
    """A replica with another PAGE_TOKEN_KEY refuses the token; one with the same accepts it."""
    profile = as_profile(new_profile_id())
    token = await _first_page_token(jobs_stub, profile)
    second_page = jobs_pb2.ListJobsRequest(page_size=1, page_token=token)
    other_key = "another-deployments-page-token-key-" + "x" * 8
    async with (
        server_process("jobs", database_url, PAGE_TOKEN_KEY=other_key) as other,
        grpc.aio.insecure_channel(f"127.0.0.1:{other.port}") as channel,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await jobs_pb2_grpc.JobServiceStub(channel).ListJobs(second_page, metadata=profile)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len((await jobs_stub.ListJobs(second_page, metadata=profile)).jobs) == 1
