"""publisher.v1.PublisherService calls, and hands on, only URLs outside the cluster: a profile
cannot point it at loopback, private or metadata addresses (the tests' Publisher trusts
127.0.0.1 only, where the fake Postiz runs)."""

import dataclasses
import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
from publisher.v1 import publisher_pb2, publisher_pb2_grpc

from services.publisher.egress import AddressRefused, EgressPolicy
from services.publisher.fake_postiz import PREFIX, api_root
from services.publisher.model import PostizAccount
from services.publisher.postiz import PostizClient
from services.publisher.service import publisher_definition
from services.publisher.settings import PublisherSettings
from tests.conftest import (
    TEST_POSTIZ_LIMITS,
    as_profile,
    new_profile_id,
    publisher_config,
    running,
    settings_for,
)
from tests.publisher_requests import expect_status
from tests.test_publisher_publish_job import completed_job, publish_request

Code = grpc.StatusCode


def credentials(base_url: str, organization) -> publisher_pb2.SetPostizCredentialsRequest:
    return publisher_pb2.SetPostizCredentialsRequest(
        base_url=base_url, api_key=organization.api_key
    )


def port_of(fake) -> int:
    return int(fake.base_url.rsplit(":", 1)[1])


async def test_base_url_whose_name_resolves_to_loopback_is_refused(
    publisher_stub, fake_postiz, profile
):
    organization = fake_postiz.add_organization()
    base_url = f"https://localhost:{port_of(fake_postiz)}{PREFIX}"
    details = await expect_status(
        publisher_stub.SetPostizCredentials(credentials(base_url, organization), metadata=profile),
        Code.INVALID_ARGUMENT,
    )
    assert "loopback" in details
    assert not [r for r in fake_postiz.requests if r.api_key == organization.api_key]


@pytest.mark.parametrize(
    "base_url",
    ["https://10.0.0.5/public/v1", "https://169.254.169.254/public/v1", "https://[::1]/v1"],
)
async def test_base_url_on_an_internal_address_is_refused(
    publisher_stub, fake_postiz, profile, base_url
):
    organization = fake_postiz.add_organization()
    await expect_status(
        publisher_stub.SetPostizCredentials(credentials(base_url, organization), metadata=profile),
        Code.INVALID_ARGUMENT,
    )


async def test_http_base_url_on_a_host_not_trusted_is_refused(publisher_stub, fake_postiz, profile):
    organization = fake_postiz.add_organization()
    base_url = f"http://localhost:{port_of(fake_postiz)}{PREFIX}"
    details = await expect_status(
        publisher_stub.SetPostizCredentials(credentials(base_url, organization), metadata=profile),
        Code.INVALID_ARGUMENT,
    )
    assert "https" in details


async def test_upload_from_a_cloud_metadata_url_is_refused_before_postiz_is_called(
    publisher_stub, fake_postiz, postiz_profile
):
    details = await expect_status(
        publisher_stub.UploadMediaFromUrl(
            publisher_pb2.UploadMediaFromUrlRequest(
                url="https://169.254.169.254/latest/meta-data/iam/"
            ),
            metadata=postiz_profile.metadata,
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "url" in details
    assert all(
        r.api_key != postiz_profile.organization.api_key
        for r in fake_postiz.requests_of("POST", "/upload-from-url")
    )


async def test_publish_job_whose_video_url_is_private_is_refused(
    jobs_stub, publisher_stub, postiz_profile
):
    job = await completed_job(
        jobs_stub, postiz_profile.metadata, video_url="https://10.0.0.7/render.mp4"
    )
    details = await expect_status(
        publisher_stub.PublishJob(
            publish_request(job, postiz_profile), metadata=postiz_profile.metadata
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "result.video_url" in details
    assert postiz_profile.organization.media == []


async def test_postiz_client_checks_the_address_a_name_resolves_to_when_it_connects(
    fake_postiz,
):
    async def to_loopback(host: str, port: int) -> list:
        return [ipaddress.ip_address("127.0.0.1")]

    client = PostizClient(EgressPolicy(resolve=to_loopback), TEST_POSTIZ_LIMITS, 1, 0.01)
    organization = fake_postiz.add_organization()
    account = PostizAccount(
        new_profile_id(), f"http://postiz.example.com:{port_of(fake_postiz)}{PREFIX}", "key"
    )
    try:
        with pytest.raises(AddressRefused, match="loopback"):
            await client.list_integrations(account)
    finally:
        await client.aclose()
    assert not [r for r in fake_postiz.requests if r.api_key == organization.api_key]


@asynccontextmanager
async def publisher_with(
    config: PublisherSettings, database_url: str
) -> AsyncIterator[publisher_pb2_grpc.PublisherServiceStub]:
    async with (
        running(publisher_definition(config), settings_for(database_url)) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        yield publisher_pb2_grpc.PublisherServiceStub(channel)


async def test_stored_base_url_the_rules_no_longer_accept_is_a_failed_precondition(
    database_url, jobs_service, fake_postiz
):
    trusting = publisher_config(jobs_service)
    profile = as_profile(new_profile_id())
    organization = fake_postiz.add_organization()
    async with publisher_with(trusting, database_url) as stub:
        await stub.SetPostizCredentials(
            credentials(api_root(fake_postiz), organization), metadata=profile
        )
    strict = dataclasses.replace(trusting, postiz_trusted_hosts=frozenset())
    async with publisher_with(strict, database_url) as stub:
        details = await expect_status(
            stub.ListIntegrations(publisher_pb2.ListIntegrationsRequest(), metadata=profile),
            Code.FAILED_PRECONDITION,
        )
    assert "SetPostizCredentials" in details
