"""publisher.v1.PublisherService: posts, exactly once per request_id."""

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
from publisher.v1 import publisher_pb2

from tests.publisher_requests import around_now, expect_status, post_request

Code = grpc.StatusCode
ACCEPTED = publisher_pb2.PUBLICATION_STATE_ACCEPTED


async def test_create_post_publishes_through_postiz_and_records_the_post_ids(
    publisher_stub, postiz_profile
):
    publication = await publisher_stub.CreatePost(
        post_request(postiz_profile), metadata=postiz_profile.metadata
    )
    stored = postiz_profile.organization.live_posts
    assert publication.state == ACCEPTED
    assert publication.attempt_count == 1
    assert [p.post_id for p in publication.posts] == [p["id"] for p in stored]
    assert publication.posts[0].integration_id == postiz_profile.organization.integrations[0]["id"]


async def test_create_post_sends_what_postiz_expects(publisher_stub, fake_postiz, postiz_profile):
    request = post_request(postiz_profile, content="Body of the post")
    request.tags.add(value="launch", label="Launch")
    request.posts[0].settings.update({"__type": "x", "who_can_reply_post": "everyone"})
    await publisher_stub.CreatePost(request, metadata=postiz_profile.metadata)
    post = postiz_profile.organization.live_posts[0]
    assert post["content"] == "<p>Body of the post</p>"
    assert post["settings"] == {"__type": "x", "who_can_reply_post": "everyone"}
    assert post["state"] == "QUEUE"


async def test_retry_with_the_same_request_id_returns_the_stored_result_without_posting(
    publisher_stub, fake_postiz, postiz_profile
):
    request = post_request(postiz_profile)
    first = await publisher_stub.CreatePost(request, metadata=postiz_profile.metadata)
    second = await publisher_stub.CreatePost(request, metadata=postiz_profile.metadata)
    assert second.posts == first.posts
    assert len(postiz_profile.organization.live_posts) == 1
    posted = [
        r
        for r in fake_postiz.requests_of("POST", "/posts")
        if r.api_key == postiz_profile.organization.api_key
    ]
    assert len(posted) == 1


async def test_concurrent_calls_with_one_request_id_post_once(publisher_stub, postiz_profile):
    request = post_request(postiz_profile)
    outcomes = await asyncio.gather(
        *(publisher_stub.CreatePost(request, metadata=postiz_profile.metadata) for _ in range(4)),
        return_exceptions=True,
    )
    succeeded = [o for o in outcomes if isinstance(o, publisher_pb2.Publication)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert succeeded
    assert all(o.code() == Code.ABORTED for o in refused)
    assert len(postiz_profile.organization.live_posts) == 1


async def test_reusing_a_request_id_for_another_post_is_invalid(publisher_stub, postiz_profile):
    await publisher_stub.CreatePost(
        post_request(postiz_profile, request_id="same"), metadata=postiz_profile.metadata
    )
    details = await expect_status(
        publisher_stub.CreatePost(
            post_request(postiz_profile, content="Something else", request_id="same"),
            metadata=postiz_profile.metadata,
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "already used" in details


async def test_post_whose_answer_timed_out_is_reconciled_not_posted_again(
    publisher_stub, fake_postiz, postiz_profile
):
    request = post_request(postiz_profile)
    fake_postiz.hang_after_accepting_posts = True
    try:
        details = await expect_status(
            publisher_stub.CreatePost(request, metadata=postiz_profile.metadata),
            Code.UNAVAILABLE,
        )
    finally:
        fake_postiz.release_hanging_posts()
    assert "same request_id" in details
    retried = await publisher_stub.CreatePost(request, metadata=postiz_profile.metadata)
    stored = postiz_profile.organization.live_posts
    assert retried.state == ACCEPTED
    assert [p.post_id for p in retried.posts] == [p["id"] for p in stored]
    assert len(stored) == 1
    posted = [
        r
        for r in fake_postiz.requests_of("POST", "/posts")
        if r.api_key == postiz_profile.organization.api_key
    ]
    assert len(posted) == 1


async def test_post_that_failed_before_postiz_stored_it_is_sent_again_on_retry(
    publisher_stub, fake_postiz, postiz_profile
):
    fake_postiz.answer_once(
        postiz_profile.organization, "POST", "/posts", 502, {"msg": "Bad gateway"}
    )
    request = post_request(postiz_profile)
    await expect_status(
        publisher_stub.CreatePost(request, metadata=postiz_profile.metadata), Code.UNAVAILABLE
    )
    retried = await publisher_stub.CreatePost(request, metadata=postiz_profile.metadata)
    assert retried.state == ACCEPTED
    assert retried.attempt_count == 2
    assert len(postiz_profile.organization.live_posts) == 1


async def test_list_posts_returns_the_posts_in_the_window(publisher_stub, postiz_profile):
    created = await publisher_stub.CreatePost(
        post_request(postiz_profile), metadata=postiz_profile.metadata
    )
    start, end = around_now()
    listed = await publisher_stub.ListPosts(
        publisher_pb2.ListPostsRequest(start_time=start, end_time=end),
        metadata=postiz_profile.metadata,
    )
    assert [p.id for p in listed.posts] == [created.posts[0].post_id]
    assert listed.posts[0].state == publisher_pb2.POST_STATE_QUEUE


async def test_list_posts_without_a_window_is_invalid(publisher_stub, postiz_profile):
    await expect_status(
        publisher_stub.ListPosts(
            publisher_pb2.ListPostsRequest(), metadata=postiz_profile.metadata
        ),
        Code.INVALID_ARGUMENT,
    )


async def test_get_post_finds_a_post_created_here_without_a_window(publisher_stub, postiz_profile):
    created = await publisher_stub.CreatePost(
        post_request(postiz_profile, content="Find me later"), metadata=postiz_profile.metadata
    )
    post = await publisher_stub.GetPost(
        publisher_pb2.GetPostRequest(post_id=created.posts[0].post_id),
        metadata=postiz_profile.metadata,
    )
    assert post.content == "<p>Find me later</p>"


async def test_get_post_of_unknown_id_is_not_found(publisher_stub, postiz_profile):
    start, end = around_now()
    await expect_status(
        publisher_stub.GetPost(
            publisher_pb2.GetPostRequest(post_id="nope", start_time=start, end_time=end),
            metadata=postiz_profile.metadata,
        ),
        Code.NOT_FOUND,
    )


async def test_delete_post_succeeds_although_postiz_answers_error_true(
    publisher_stub, postiz_profile
):
    created = await publisher_stub.CreatePost(
        post_request(postiz_profile), metadata=postiz_profile.metadata
    )
    await publisher_stub.DeletePost(
        publisher_pb2.DeletePostRequest(post_id=created.posts[0].post_id),
        metadata=postiz_profile.metadata,
    )
    assert postiz_profile.organization.live_posts == []


async def test_create_post_without_request_id_is_invalid(publisher_stub, postiz_profile):
    request = post_request(postiz_profile)
    request.request_id = ""
    await expect_status(
        publisher_stub.CreatePost(request, metadata=postiz_profile.metadata),
        Code.INVALID_ARGUMENT,
    )


async def test_retry_while_an_abandoned_attempt_may_still_be_in_flight_is_aborted(
    publisher_stub, fake_postiz, postiz_profile
):
    request = post_request(postiz_profile)
    fake_postiz.hang_after_accepting_posts = True
    try:
        call = publisher_stub.CreatePost(request, metadata=postiz_profile.metadata)
        await fake_postiz.hanging.wait()
        call.cancel()
        details = await expect_status(
            publisher_stub.CreatePost(request, metadata=postiz_profile.metadata), Code.ABORTED
        )
    finally:
        fake_postiz.release_hanging_posts()
    assert "same request_id" in details
    assert len(postiz_profile.organization.live_posts) == 1


async def test_reconciling_does_not_take_an_identical_post_of_another_request(
    publisher_stub, fake_postiz, postiz_profile
):
    when = datetime.now(UTC) + timedelta(hours=2)
    earlier = await publisher_stub.CreatePost(
        post_request(postiz_profile, publish_time=when), metadata=postiz_profile.metadata
    )
    fake_postiz.answer_once(postiz_profile.organization, "POST", "/posts", 504, {})
    request = post_request(postiz_profile, publish_time=when)
    await expect_status(
        publisher_stub.CreatePost(request, metadata=postiz_profile.metadata), Code.UNAVAILABLE
    )
    retried = await publisher_stub.CreatePost(request, metadata=postiz_profile.metadata)
    assert retried.posts[0].post_id != earlier.posts[0].post_id
    assert len(postiz_profile.organization.live_posts) == 2


async def test_create_post_naming_one_channel_twice_is_invalid(publisher_stub, postiz_profile):
    request = post_request(postiz_profile)
    request.posts.append(request.posts[0])
    details = await expect_status(
        publisher_stub.CreatePost(request, metadata=postiz_profile.metadata),
        Code.INVALID_ARGUMENT,
    )
    assert "more than once" in details
    assert postiz_profile.organization.live_posts == []
