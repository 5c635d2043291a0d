"""One profile's Postiz cannot slow or starve another's: each profile has connections of its
own, every call is over within its total time, and answers are read up to a cap."""

import asyncio
import dataclasses
import gzip
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from publisher.v1 import publisher_pb2, publisher_pb2_grpc
from starlette.responses import Response

from services.publisher.fake_postiz import FakePostiz, dribbling, serve_fake_postiz, streamed
from services.publisher.service import publisher_definition
from tests.conftest import (
    TEST_POSTIZ_LIMITS,
    PostizProfile,
    connect_profile,
    publisher_config,
    running,
    settings_for,
)
from tests.publisher_requests import expect_status, post_request

Code = grpc.StatusCode
CONNECTIONS = TEST_POSTIZ_LIMITS.connections_per_profile
LIST_INTEGRATIONS = publisher_pb2.ListIntegrationsRequest()
TOO_LARGE = b"[" + b" " * TEST_POSTIZ_LIMITS.max_response_bytes + b"]"


async def first_to_end(calls: list[asyncio.Future], count: int) -> list[object]:
    """What the first `count` calls to end ended with (an answer or an error)."""
    outcomes: list[object] = []
    for ended in asyncio.as_completed(calls):
        try:
            outcomes.append(await ended)
        except grpc.aio.AioRpcError as error:
            outcomes.append(error)
        if len(outcomes) == count:
            return outcomes
    return outcomes


@pytest.fixture(scope="module")
async def patient_stub(
    database_url: str, jobs_service
) -> AsyncIterator[publisher_pb2_grpc.PublisherServiceStub]:
    """A Publisher whose calls wait long and are not retried, so that a stalled Postiz holds
    them for the whole test."""
    config = dataclasses.replace(
        publisher_config(jobs_service),
        postiz_limits=dataclasses.replace(TEST_POSTIZ_LIMITS, timeout_seconds=20.0),
        postiz_get_attempts=1,
    )
    async with (
        running(publisher_definition(config), settings_for(database_url)) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        yield publisher_pb2_grpc.PublisherServiceStub(channel)


async def _hold_connections(
    stub: publisher_pb2_grpc.PublisherServiceStub,
    stalling: FakePostiz,
    profile: PostizProfile,
    calls: int,
) -> list[asyncio.Future]:
    """`calls` ListIntegrations of the profile against its stalled Postiz, returned once the
    profile's CONNECTIONS connections are all held by them."""
    stalling.stall(profile.organization)
    pending = [
        asyncio.ensure_future(stub.ListIntegrations(LIST_INTEGRATIONS, metadata=profile.metadata))
        for _ in range(calls)
    ]
    await stalling.stalled_requests_reach(CONNECTIONS)
    return pending


async def test_a_stalled_postiz_holds_no_more_than_its_profiles_connections(patient_stub):
    async with serve_fake_postiz() as stalling:
        stalled = await connect_profile(patient_stub, stalling)
        calls = await _hold_connections(patient_stub, stalling, stalled, 3 * CONNECTIONS)
        refused = await first_to_end(calls, len(calls) - CONNECTIONS)
        held = stalling.stalled_requests
        stalling.unstall(stalled.organization)
        await asyncio.gather(*calls, return_exceptions=True)
    assert held == CONNECTIONS
    assert {error.code() for error in refused} == {Code.RESOURCE_EXHAUSTED}
    assert "calls to Postiz in flight" in refused[0].details()


async def test_a_stalled_postiz_does_not_delay_another_profiles_calls(patient_stub, fake_postiz):
    async with serve_fake_postiz() as stalling:
        stalled = await connect_profile(patient_stub, stalling)
        calls = await _hold_connections(patient_stub, stalling, stalled, 3 * CONNECTIONS)
        other = await connect_profile(patient_stub, fake_postiz)
        answer = await patient_stub.ListIntegrations(LIST_INTEGRATIONS, metadata=other.metadata)
        still_stalled = stalling.stalled_requests
        stalling.unstall(stalled.organization)
        await asyncio.gather(*calls, return_exceptions=True)
    assert len(answer.integrations) == len(other.organization.integrations)
    assert still_stalled == CONNECTIONS


async def test_create_post_finding_no_free_connection_was_not_sent_and_is_retried_at_once(
    patient_stub,
):
    async with serve_fake_postiz() as stalling:
        profile = await connect_profile(patient_stub, stalling)
        calls = await _hold_connections(patient_stub, stalling, profile, CONNECTIONS)
        request = post_request(profile)
        await expect_status(
            patient_stub.CreatePost(request, metadata=profile.metadata), Code.RESOURCE_EXHAUSTED
        )
        stalling.unstall(profile.organization)
        await asyncio.gather(*calls)
        publication = await patient_stub.CreatePost(request, metadata=profile.metadata)
        searched = stalling.requests_of("GET", "/posts")
        sent = stalling.requests_of("POST", "/posts")
    assert publication.state == publisher_pb2.PUBLICATION_STATE_ACCEPTED
    assert (len(sent), len(searched)) == (1, 0)


async def test_an_answer_dribbled_forever_ends_at_the_total_time_limit(
    publisher_stub, fake_postiz, postiz_profile
):
    fake_postiz.answer_once_with(
        postiz_profile.organization, "DELETE", "/posts/post-1", lambda: dribbling(0.5)
    )
    started = time.monotonic()
    details = await expect_status(
        publisher_stub.DeletePost(
            publisher_pb2.DeletePostRequest(post_id="post-1"),
            metadata=postiz_profile.metadata,
            timeout=10,
        ),
        Code.UNAVAILABLE,
    )
    elapsed = time.monotonic() - started
    assert f"did not answer within {TEST_POSTIZ_LIMITS.timeout_seconds:g}s" in details
    assert elapsed < TEST_POSTIZ_LIMITS.timeout_seconds + 1.5


@pytest.mark.parametrize(
    "answer",
    [
        lambda: Response(TOO_LARGE, media_type="application/json"),
        lambda: streamed(TOO_LARGE),
    ],
    ids=["with-content-length", "chunked"],
)
async def test_an_answer_larger_than_the_cap_is_unavailable(
    publisher_stub, fake_postiz, postiz_profile, answer
):
    fake_postiz.answer_once_with(postiz_profile.organization, "DELETE", "/posts/post-1", answer)
    details = await expect_status(
        publisher_stub.DeletePost(
            publisher_pb2.DeletePostRequest(post_id="post-1"), metadata=postiz_profile.metadata
        ),
        Code.UNAVAILABLE,
    )
    assert f"Postiz answered more than {TEST_POSTIZ_LIMITS.max_response_bytes} bytes" in details


async def test_a_compressed_answer_is_not_decompressed(publisher_stub, fake_postiz, postiz_profile):
    bomb = gzip.compress(b"[" + b" " * (2 * TEST_POSTIZ_LIMITS.max_response_bytes) + b"]")
    fake_postiz.answer_once_with(
        postiz_profile.organization,
        "DELETE",
        "/posts/post-1",
        lambda: Response(bomb, media_type="application/json", headers={"Content-Encoding": "gzip"}),
    )
    details = await expect_status(
        publisher_stub.DeletePost(
            publisher_pb2.DeletePostRequest(post_id="post-1"), metadata=postiz_profile.metadata
        ),
        Code.UNAVAILABLE,
    )
    assert "encoded as 'gzip'" in details
