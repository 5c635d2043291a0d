"""publisher.v1.PublisherService: Postiz's answers as gRPC statuses, retries and rate limits."""

import logging

import grpc
import pytest
from publisher.v1 import publisher_pb2
from starlette.responses import Response

from tests.conftest import TEST_POSTS_PER_HOUR, connect_profile
from tests.publisher_requests import expect_status, post_request

Code = grpc.StatusCode


def posts_sent(fake, profile) -> int:
    return sum(
        r.api_key == profile.organization.api_key for r in fake.requests_of("POST", "/posts")
    )


async def test_key_revoked_in_postiz_is_a_failed_precondition_naming_the_key(
    publisher_stub, fake_postiz, postiz_profile
):
    fake_postiz.answer_once(
        postiz_profile.organization, "GET", "/integrations", 401, {"msg": "Invalid API key"}
    )
    details = await expect_status(
        publisher_stub.ListIntegrations(
            publisher_pb2.ListIntegrationsRequest(), metadata=postiz_profile.metadata
        ),
        Code.FAILED_PRECONDITION,
    )
    assert "Postiz rejected this profile's API key" in details


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"msg": "Integration not found"}, "Integration not found"),
        (
            {"statusCode": 400, "message": ["date must be a valid date"], "error": "Bad Request"},
            "date must be a valid date",
        ),
    ],
)
async def test_postiz_validation_error_is_invalid_argument_with_its_message(
    publisher_stub, fake_postiz, postiz_profile, body, expected
):
    fake_postiz.answer_once(postiz_profile.organization, "POST", "/posts", 400, body)
    details = await expect_status(
        publisher_stub.CreatePost(post_request(postiz_profile), metadata=postiz_profile.metadata),
        Code.INVALID_ARGUMENT,
    )
    assert expected in details


async def test_content_postiz_finds_too_short_is_invalid_argument(publisher_stub, postiz_profile):
    details = await expect_status(
        publisher_stub.CreatePost(
            post_request(postiz_profile, content="hi"), metadata=postiz_profile.metadata
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "6 characters" in details


async def test_plan_quota_is_a_failed_precondition(publisher_stub, fake_postiz, postiz_profile):
    fake_postiz.answer_once(
        postiz_profile.organization,
        "POST",
        "/posts",
        402,
        {"msg": "You have reached the maximum posts for your plan"},
    )
    details = await expect_status(
        publisher_stub.CreatePost(post_request(postiz_profile), metadata=postiz_profile.metadata),
        Code.FAILED_PRECONDITION,
    )
    assert "maximum posts" in details


async def test_postiz_429_is_resource_exhausted_with_its_retry_after(
    publisher_stub, fake_postiz, postiz_profile
):
    fake_postiz.answer_once(
        postiz_profile.organization,
        "POST",
        "/posts",
        429,
        {"statusCode": 429, "message": "ThrottlerException: Too Many Requests"},
        {"Retry-After": "120"},
    )
    details = await expect_status(
        publisher_stub.CreatePost(post_request(postiz_profile), metadata=postiz_profile.metadata),
        Code.RESOURCE_EXHAUSTED,
    )
    assert "retry in 120s" in details


async def test_after_a_429_no_post_is_sent_until_retry_after_has_passed(
    publisher_stub, fake_postiz, postiz_profile
):
    fake_postiz.answer_once(
        postiz_profile.organization, "POST", "/posts", 429, {}, {"Retry-After": "600"}
    )
    await expect_status(
        publisher_stub.CreatePost(post_request(postiz_profile), metadata=postiz_profile.metadata),
        Code.RESOURCE_EXHAUSTED,
    )
    sent = posts_sent(fake_postiz, postiz_profile)
    await expect_status(
        publisher_stub.CreatePost(post_request(postiz_profile), metadata=postiz_profile.metadata),
        Code.RESOURCE_EXHAUSTED,
    )
    assert posts_sent(fake_postiz, postiz_profile) == sent


async def test_spent_postiz_budget_reported_in_headers_stops_further_posts(
    publisher_stub, fake_postiz
):
    profile = await connect_profile(publisher_stub, fake_postiz, posts_per_hour=1)
    await publisher_stub.CreatePost(post_request(profile), metadata=profile.metadata)
    details = await expect_status(
        publisher_stub.CreatePost(post_request(profile), metadata=profile.metadata),
        Code.RESOURCE_EXHAUSTED,
    )
    assert "retry in" in details
    assert posts_sent(fake_postiz, profile) == 1


async def test_profile_budget_refuses_posts_beyond_it_with_the_delay(
    publisher_stub, fake_postiz, postiz_profile
):
    for _ in range(TEST_POSTS_PER_HOUR):
        await publisher_stub.CreatePost(
            post_request(postiz_profile), metadata=postiz_profile.metadata
        )
    details = await expect_status(
        publisher_stub.CreatePost(post_request(postiz_profile), metadata=postiz_profile.metadata),
        Code.RESOURCE_EXHAUSTED,
    )
    assert f"budget of {TEST_POSTS_PER_HOUR} posts an hour" in details
    assert "retry in" in details
    assert posts_sent(fake_postiz, postiz_profile) == TEST_POSTS_PER_HOUR


async def test_one_profiles_spent_budget_does_not_limit_another(
    publisher_stub, fake_postiz, postiz_profile
):
    for _ in range(TEST_POSTS_PER_HOUR):
        await publisher_stub.CreatePost(
            post_request(postiz_profile), metadata=postiz_profile.metadata
        )
    other = await connect_profile(publisher_stub, fake_postiz)
    publication = await publisher_stub.CreatePost(post_request(other), metadata=other.metadata)
    assert publication.state == publisher_pb2.PUBLICATION_STATE_ACCEPTED


async def test_reads_are_retried_after_a_server_error(publisher_stub, fake_postiz, postiz_profile):
    fake_postiz.answer_once(postiz_profile.organization, "GET", "/integrations", 503, {})
    fake_postiz.answer_once(postiz_profile.organization, "GET", "/integrations", 500, {})
    answer = await publisher_stub.ListIntegrations(
        publisher_pb2.ListIntegrationsRequest(), metadata=postiz_profile.metadata
    )
    assert len(answer.integrations) == len(postiz_profile.organization.integrations)


async def test_reads_failing_every_try_are_unavailable(publisher_stub, fake_postiz, postiz_profile):
    for _ in range(3):
        fake_postiz.answer_once(postiz_profile.organization, "GET", "/integrations", 500, {})
    await expect_status(
        publisher_stub.ListIntegrations(
            publisher_pb2.ListIntegrationsRequest(), metadata=postiz_profile.metadata
        ),
        Code.UNAVAILABLE,
    )


async def test_a_failed_create_post_is_not_retried_blindly(
    publisher_stub, fake_postiz, postiz_profile
):
    fake_postiz.answer_once(postiz_profile.organization, "POST", "/posts", 500, {})
    await expect_status(
        publisher_stub.CreatePost(post_request(postiz_profile), metadata=postiz_profile.metadata),
        Code.UNAVAILABLE,
    )
    assert posts_sent(fake_postiz, postiz_profile) == 1


async def test_unreachable_postiz_is_unavailable(publisher_stub, postiz_profile, fake_postiz):
    org = fake_postiz.add_organization()
    request = publisher_pb2.SetPostizCredentialsRequest(
        base_url="http://127.0.0.1:9/public/v1", api_key=org.api_key
    )
    await expect_status(
        publisher_stub.SetPostizCredentials(request, metadata=postiz_profile.metadata),
        Code.UNAVAILABLE,
    )


async def test_api_key_never_appears_in_logs(publisher_stub, fake_postiz, profile, caplog):
    org = fake_postiz.add_organization()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(grpc.aio.AioRpcError):
        await publisher_stub.SetPostizCredentials(
            publisher_pb2.SetPostizCredentialsRequest(
                base_url=fake_postiz.base_url + "/public/v1", api_key="rejected-key-123"
            ),
            metadata=profile,
        )
    await publisher_stub.SetPostizCredentials(
        publisher_pb2.SetPostizCredentialsRequest(
            base_url=fake_postiz.base_url + "/public/v1", api_key=org.api_key
        ),
        metadata=profile,
    )
    await publisher_stub.ListIntegrations(publisher_pb2.ListIntegrationsRequest(), metadata=profile)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "Postiz credentials set" in logged
    assert org.api_key not in logged
    assert "rejected-key-123" not in logged


async def test_an_html_error_page_is_named_by_its_type_not_relayed(
    publisher_stub, fake_postiz, postiz_profile
):
    page = "<html><body>upstream 10.3.0.7:3000 internal trace</body></html>"
    fake_postiz.answer_once_with(
        postiz_profile.organization,
        "DELETE",
        "/posts/post-1",
        lambda: Response(page, status_code=502, media_type="text/html"),
    )
    details = await expect_status(
        publisher_stub.DeletePost(
            publisher_pb2.DeletePostRequest(post_id="post-1"), metadata=postiz_profile.metadata
        ),
        Code.UNAVAILABLE,
    )
    assert "Postiz answered 502" in details
    assert "text/html" in details
    assert "10.3.0.7" not in details


async def test_postiz_message_is_relayed_short_and_without_control_characters(
    publisher_stub, fake_postiz, postiz_profile
):
    said = "Integration \x1b[31mnot\r\nfound " + "x" * 5000
    fake_postiz.answer_once(postiz_profile.organization, "POST", "/posts", 400, {"msg": said})
    details = await expect_status(
        publisher_stub.CreatePost(post_request(postiz_profile), metadata=postiz_profile.metadata),
        Code.INVALID_ARGUMENT,
    )
    assert "Integration [31mnot found x" in details
    assert details.isprintable()
    assert len(details) < 300
