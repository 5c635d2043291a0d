"""Which URLs a profile may have the Publisher call or hand on: https, public addresses only,
unless a host is trusted; the allow-list, when set, names the only Postiz hosts."""

import ipaddress
import socket

import pytest

from services.publisher.egress import AddressRefused, EgressPolicy
from services.runtime.errors import InvalidArgument

NON_PUBLIC_HOSTS = [
    "127.0.0.1",
    "10.0.0.5",
    "172.16.3.4",
    "192.168.1.10",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",
    "224.0.0.1",
    "240.0.0.1",
    "[::1]",
    "[::]",
    "[fe80::1]",
    "[fd00:ec2::254]",
    "[fc00::5]",
    "[ff02::1]",
    "[::ffff:127.0.0.1]",
    "[64:ff9b::a00:1]",
]


def resolving(table: dict[str, list[str]]):
    """A resolver that answers from the table, as DNS would; no such name otherwise."""

    async def resolve(host: str, port: int) -> list:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [ipaddress.ip_address(address) for address in table[host]]

    return resolve


def test_base_url_loses_its_trailing_slash():
    assert EgressPolicy().postiz_base_url("https://api.postiz.com/public/v1/") == (
        "https://api.postiz.com/public/v1"
    )


@pytest.mark.parametrize("host", NON_PUBLIC_HOSTS)
def test_base_url_naming_a_non_public_address_is_refused(host: str):
    with pytest.raises(AddressRefused):
        EgressPolicy().postiz_base_url(f"https://{host}/public/v1")


@pytest.mark.parametrize(
    "host", ["metadata.google.internal", "METADATA.google.internal.", "metadata"]
)
def test_base_url_naming_a_cloud_metadata_host_is_refused(host: str):
    with pytest.raises(AddressRefused, match="metadata"):
        EgressPolicy().postiz_base_url(f"https://{host}/computeMetadata/v1")


def test_http_base_url_is_refused():
    with pytest.raises(AddressRefused, match="https"):
        EgressPolicy().postiz_base_url("http://postiz.example.com/api/public/v1")


def test_base_url_on_a_trusted_host_may_be_http_and_loopback():
    policy = EgressPolicy(trusted_hosts=["127.0.0.1"])
    assert policy.postiz_base_url("http://127.0.0.1:5000/public/v1") == (
        "http://127.0.0.1:5000/public/v1"
    )


def test_another_spelling_of_a_trusted_address_is_not_trusted():
    with pytest.raises(AddressRefused):
        EgressPolicy(trusted_hosts=["127.0.0.1"]).postiz_base_url("http://localhost/public/v1")


@pytest.mark.parametrize(
    "base_url",
    [
        "ftp://postiz.example.com/public/v1",
        "https:///public/v1",
        "https://user:secret@postiz.example.com/public/v1",
        "https://postiz.example.com/public/v1?x=1",
        "https://postiz.example.com:99999/public/v1",
    ],
)
def test_base_url_that_is_not_an_api_root_is_invalid(base_url: str):
    with pytest.raises(InvalidArgument, match="public API root"):
        EgressPolicy().postiz_base_url(base_url)


def test_base_url_on_an_allowed_host_is_accepted():
    policy = EgressPolicy(allowed_postiz_hosts=["api.postiz.com"])
    assert policy.postiz_base_url("https://api.postiz.com/public/v1")


def test_base_url_on_a_host_not_allowed_is_refused():
    policy = EgressPolicy(allowed_postiz_hosts=["api.postiz.com"])
    with pytest.raises(AddressRefused, match="not an allowed Postiz host"):
        policy.postiz_base_url("https://postiz.example.com/public/v1")


def test_a_trusted_host_must_also_be_allowed_when_the_allow_list_is_set():
    policy = EgressPolicy(trusted_hosts=["127.0.0.1"], allowed_postiz_hosts=["api.postiz.com"])
    with pytest.raises(AddressRefused, match="not an allowed Postiz host"):
        policy.postiz_base_url("http://127.0.0.1:5000/public/v1")


async def test_url_handed_on_whose_name_resolves_to_loopback_is_refused():
    policy = EgressPolicy(resolve=resolving({"cdn.example.com": ["127.0.0.1"]}))
    with pytest.raises(AddressRefused, match="loopback"):
        await policy.public_url("https://cdn.example.com/video.mp4", "url")


async def test_url_handed_on_whose_name_resolves_to_any_private_address_is_refused():
    policy = EgressPolicy(resolve=resolving({"cdn.example.com": ["93.184.216.34", "10.1.2.3"]}))
    with pytest.raises(AddressRefused, match=r"10\.1\.2\.3"):
        await policy.public_url("https://cdn.example.com/video.mp4", "url")


async def test_url_handed_on_whose_name_resolves_to_public_addresses_is_accepted():
    policy = EgressPolicy(resolve=resolving({"cdn.example.com": ["93.184.216.34"]}))
    url = "https://cdn.example.com/video.mp4"
    assert await policy.public_url(url, "url") == url


async def test_localhost_is_refused_through_the_system_resolver():
    with pytest.raises(AddressRefused, match="loopback"):
        await EgressPolicy().public_url("https://localhost/video.mp4", "url")


async def test_url_handed_on_whose_name_does_not_resolve_is_invalid():
    policy = EgressPolicy(resolve=resolving({}))
    with pytest.raises(InvalidArgument, match="does not resolve"):
        await policy.public_url("https://no-such-host.example/video.mp4", "url")


async def test_http_url_handed_on_is_refused():
    with pytest.raises(AddressRefused, match="https"):
        await EgressPolicy().public_url("http://cdn.example.com/video.mp4", "url")


async def test_url_handed_on_from_a_trusted_host_is_not_resolved_or_checked():
    policy = EgressPolicy(trusted_hosts=["media.local"], resolve=resolving({}))
    assert await policy.public_url("http://media.local/video.mp4", "url")
