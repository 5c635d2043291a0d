"""publisher.v1.PublisherService: each profile's own Postiz credentials."""

import asyncpg
import grpc
import pytest
from publisher.v1 import publisher_pb2

from services.publisher.fake_postiz import api_root
from tests.conftest import as_profile, connect_profile, new_profile_id

Code = grpc.StatusCode


async def expect_status(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code, raised.value.details()
    return raised.value.details()


def set_request(fake, api_key: str) -> publisher_pb2.SetPostizCredentialsRequest:
    return publisher_pb2.SetPostizCredentialsRequest(base_url=api_root(fake), api_key=api_key)


async def test_set_credentials_answers_with_a_fingerprint_and_never_the_key(
    publisher_stub, fake_postiz, profile
):
    org = fake_postiz.add_organization()
    answer = await publisher_stub.SetPostizCredentials(
        set_request(fake_postiz, org.api_key), metadata=profile
    )
    assert answer.base_url == api_root(fake_postiz)
    assert answer.api_key_fingerprint.startswith("sha256:")
    assert org.api_key not in str(answer)
    assert answer.verify_time.seconds > 0


async def test_set_credentials_checks_the_key_with_is_connected_sending_it_without_bearer(
    publisher_stub, fake_postiz, profile
):
    org = fake_postiz.add_organization()
    await publisher_stub.SetPostizCredentials(
        set_request(fake_postiz, org.api_key), metadata=profile
    )
    checks = [
        r for r in fake_postiz.requests_of("GET", "/is-connected") if r.api_key == org.api_key
    ]
    assert len(checks) == 1


async def test_get_credentials_shows_what_set_answered(publisher_stub, postiz_profile):
    got = await publisher_stub.GetPostizCredentials(
        publisher_pb2.GetPostizCredentialsRequest(), metadata=postiz_profile.metadata
    )
    assert got.api_key_fingerprint.startswith("sha256:")
    assert postiz_profile.organization.api_key not in str(got)


async def test_key_rejected_by_postiz_is_a_failed_precondition_and_is_not_stored(
    publisher_stub, fake_postiz, profile
):
    details = await expect_status(
        publisher_stub.SetPostizCredentials(
            set_request(fake_postiz, "not-a-key-postiz-knows"), metadata=profile
        ),
        Code.FAILED_PRECONDITION,
    )
    assert "Postiz rejected this profile's API key" in details
    assert "not-a-key-postiz-knows" not in details
    await expect_status(
        publisher_stub.GetPostizCredentials(
            publisher_pb2.GetPostizCredentialsRequest(), metadata=profile
        ),
        Code.NOT_FOUND,
    )


@pytest.mark.parametrize(
    "base_url", ["", "ftp://postiz.example/public/v1", "https://user:pw@postiz.example/v1"]
)
async def test_set_credentials_with_a_bad_base_url_is_invalid(
    publisher_stub, fake_postiz, profile, base_url
):
    request = publisher_pb2.SetPostizCredentialsRequest(base_url=base_url, api_key="k" * 20)
    await expect_status(
        publisher_stub.SetPostizCredentials(request, metadata=profile), Code.INVALID_ARGUMENT
    )


async def test_profile_without_credentials_is_told_how_to_set_them(publisher_stub, profile):
    details = await expect_status(
        publisher_stub.ListIntegrations(publisher_pb2.ListIntegrationsRequest(), metadata=profile),
        Code.FAILED_PRECONDITION,
    )
    assert "SetPostizCredentials" in details


async def test_delete_credentials_removes_them(publisher_stub, postiz_profile):
    await publisher_stub.DeletePostizCredentials(
        publisher_pb2.DeletePostizCredentialsRequest(), metadata=postiz_profile.metadata
    )
    await expect_status(
        publisher_stub.ListIntegrations(
            publisher_pb2.ListIntegrationsRequest(), metadata=postiz_profile.metadata
        ),
        Code.FAILED_PRECONDITION,
    )


async def test_delete_credentials_of_a_profile_without_them_is_not_found(publisher_stub, profile):
    await expect_status(
        publisher_stub.DeletePostizCredentials(
            publisher_pb2.DeletePostizCredentialsRequest(), metadata=profile
        ),
        Code.NOT_FOUND,
    )


async def test_list_integrations_returns_the_organizations_channels(publisher_stub, postiz_profile):
    answer = await publisher_stub.ListIntegrations(
        publisher_pb2.ListIntegrationsRequest(), metadata=postiz_profile.metadata
    )
    expected = postiz_profile.organization.integrations
    assert [i.id for i in answer.integrations] == [i["id"] for i in expected]
    assert answer.integrations[0].identifier == expected[0]["identifier"]
    assert answer.integrations[0].profile == expected[0]["profile"]


async def test_each_profile_calls_postiz_with_its_own_key_only(publisher_stub, fake_postiz):
    a = await connect_profile(publisher_stub, fake_postiz)
    b = await connect_profile(publisher_stub, fake_postiz)
    seen_before = len(fake_postiz.requests)
    answer_b = await publisher_stub.ListIntegrations(
        publisher_pb2.ListIntegrationsRequest(), metadata=b.metadata
    )
    answer_a = await publisher_stub.ListIntegrations(
        publisher_pb2.ListIntegrationsRequest(), metadata=a.metadata
    )
    keys = [r.api_key for r in fake_postiz.requests[seen_before:]]
    assert keys == [b.organization.api_key, a.organization.api_key]
    assert {i.id for i in answer_b.integrations} == {i["id"] for i in b.organization.integrations}
    assert {i.id for i in answer_a.integrations}.isdisjoint({i.id for i in answer_b.integrations})


async def test_another_profiles_credentials_are_never_used(publisher_stub, fake_postiz):
    await connect_profile(publisher_stub, fake_postiz)
    stranger = as_profile(new_profile_id())
    seen_before = len(fake_postiz.requests)
    await expect_status(
        publisher_stub.ListIntegrations(publisher_pb2.ListIntegrationsRequest(), metadata=stranger),
        Code.FAILED_PRECONDITION,
    )
    assert len(fake_postiz.requests) == seen_before


async def test_api_key_is_stored_only_encrypted(publisher_stub, postiz_profile, database_url):
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch("SELECT * FROM publisher.postiz_credentials")
    finally:
        await connection.close()
    key = postiz_profile.organization.api_key
    stored = [str(value) for row in rows for value in row.values()]
    stored += [
        bytes(value).hex() for row in rows for value in row.values() if isinstance(value, bytes)
    ]
    assert rows
    assert not any(key in value or key.encode().hex() in value for value in stored)
