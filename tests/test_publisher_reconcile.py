"""CreatePost retried after an attempt of unknown outcome: Postiz is searched, and a post is
adopted only when it is the one match on its channel, made no earlier than the attempt."""

import uuid
from datetime import UTC, datetime, timedelta

import grpc
from publisher.v1 import publisher_pb2

from tests.conftest import PostizProfile
from tests.publisher_requests import expect_status, timestamp

Code = grpc.StatusCode
ACCEPTED = publisher_pb2.PUBLICATION_STATE_ACCEPTED
CONTENT = "Our launch video is out"


def both_channels(
    profile: PostizProfile, when: datetime | None = None
) -> publisher_pb2.CreatePostRequest:
    """CONTENT on each of the profile's two channels: now, or scheduled `when`."""
    request = publisher_pb2.CreatePostRequest(
        request_id=str(uuid.uuid4()),
        type=publisher_pb2.POST_TYPE_NOW,
        posts=[
            publisher_pb2.IntegrationPost(
                integration_id=integration["id"],
                values=[publisher_pb2.PostValue(content=CONTENT)],
            )
            for integration in profile.organization.integrations
        ],
    )
    if when is not None:
        request.type = publisher_pb2.POST_TYPE_SCHEDULE
        request.publish_time.CopyFrom(timestamp(when))
    return request


def posts_sent(fake, profile: PostizProfile) -> int:
    return sum(
        1 for r in fake.requests_of("POST", "/posts") if r.api_key == profile.organization.api_key
    )


def live_post_ids(profile: PostizProfile) -> list[str]:
    return [post["id"] for post in profile.organization.live_posts]


async def _unknown_outcome(publisher_stub, profile: PostizProfile, request) -> None:
    details = await expect_status(
        publisher_stub.CreatePost(request, metadata=profile.metadata), Code.UNAVAILABLE
    )
    assert "same request_id" in details


async def test_posts_the_attempt_made_on_every_channel_are_adopted(
    publisher_stub, fake_postiz, postiz_profile
):
    request = both_channels(postiz_profile)
    fake_postiz.hang_after_accepting_posts = True
    try:
        await _unknown_outcome(publisher_stub, postiz_profile, request)
    finally:
        fake_postiz.release_hanging_posts()
    retried = await publisher_stub.CreatePost(request, metadata=postiz_profile.metadata)
    assert retried.state == ACCEPTED
    assert [p.post_id for p in retried.posts] == live_post_ids(postiz_profile)
    assert posts_sent(fake_postiz, postiz_profile) == 1


async def test_identical_post_older_than_the_attempt_is_not_adopted(
    publisher_stub, fake_postiz, postiz_profile
):
    channel = postiz_profile.organization.integrations[0]["id"]
    earlier = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=2)
    older = fake_postiz.add_post(postiz_profile.organization, channel, CONTENT, earlier)
    request = both_channels(postiz_profile)
    del request.posts[1:]
    fake_postiz.answer_once(postiz_profile.organization, "POST", "/posts", 504, {})
    await _unknown_outcome(publisher_stub, postiz_profile, request)
    retried = await publisher_stub.CreatePost(request, metadata=postiz_profile.metadata)
    assert retried.state == ACCEPTED
    assert [p.post_id for p in retried.posts] != [older["id"]]
    assert len(live_post_ids(postiz_profile)) == 2
    assert posts_sent(fake_postiz, postiz_profile) == 2


async def test_partial_match_posts_only_on_the_channels_without_a_post(
    publisher_stub, fake_postiz, postiz_profile
):
    organization = postiz_profile.organization
    request = both_channels(postiz_profile)
    organization.store_posts_then_fail = 1
    try:
        await _unknown_outcome(publisher_stub, postiz_profile, request)
    finally:
        organization.store_posts_then_fail = None
    [first] = live_post_ids(postiz_profile)
    retried = await publisher_stub.CreatePost(request, metadata=postiz_profile.metadata)
    channels = [integration["id"] for integration in organization.integrations]
    assert retried.state == ACCEPTED
    assert [p.integration_id for p in retried.posts] == channels
    assert retried.posts[0].post_id == first
    assert sorted(p["integration"]["id"] for p in organization.live_posts) == sorted(channels)
    assert posts_sent(fake_postiz, postiz_profile) == 2


async def _two_candidates(publisher_stub, fake_postiz, profile) -> tuple[object, list[str]]:
    """A scheduled request whose attempt's outcome is unknown, and two identical posts on its
    channel at its time, either of which it may have made."""
    when = (datetime.now(UTC) + timedelta(hours=3)).replace(microsecond=0)
    request = both_channels(profile, when)
    del request.posts[1:]
    fake_postiz.answer_once(profile.organization, "POST", "/posts", 504, {})
    await _unknown_outcome(publisher_stub, profile, request)
    channel = profile.organization.integrations[0]["id"]
    candidates = [
        fake_postiz.add_post(profile.organization, channel, CONTENT, when)["id"] for _ in range(2)
    ]
    return request, candidates


async def test_two_candidate_posts_on_a_channel_leave_the_outcome_unknown(
    publisher_stub, fake_postiz, postiz_profile
):
    request, candidates = await _two_candidates(publisher_stub, fake_postiz, postiz_profile)
    for _ in range(2):
        details = await expect_status(
            publisher_stub.CreatePost(request, metadata=postiz_profile.metadata),
            Code.FAILED_PRECONDITION,
        )
        assert all(candidate in details for candidate in candidates)
        assert "DeletePost" in details
    assert live_post_ids(postiz_profile) == candidates
    assert posts_sent(fake_postiz, postiz_profile) == 1


async def test_deleting_the_extra_candidate_lets_a_retry_adopt_the_one_left(
    publisher_stub, fake_postiz, postiz_profile
):
    profile = postiz_profile
    request, (extra, kept) = await _two_candidates(publisher_stub, fake_postiz, profile)
    await publisher_stub.DeletePost(
        publisher_pb2.DeletePostRequest(post_id=extra), metadata=profile.metadata
    )
    retried = await publisher_stub.CreatePost(request, metadata=profile.metadata)
    assert retried.state == ACCEPTED
    assert [p.post_id for p in retried.posts] == [kept]
    assert posts_sent(fake_postiz, profile) == 1
