"""The Publisher's network backend checks the addresses a name resolves to when it connects,
and connects to the address it checked (so a name that resolves elsewhere later, DNS
rebinding, is still refused)."""

import ipaddress

import httpcore
import pytest

from services.publisher.egress import AddressRefused, EgressPolicy, PublicAddressBackend


class RecordingBackend(httpcore.AsyncMockBackend):
    """httpcore's in-memory network, noting where it was asked to connect."""

    def __init__(self) -> None:
        super().__init__([b"HTTP/1.1 204 No Content\r\n\r\n"])
        self.connected_to: list[str] = []

    async def connect_tcp(self, host: str, port: int, *args, **kwargs):  # type: ignore[override]
        self.connected_to.append(host)
        return await super().connect_tcp(host, port, *args, **kwargs)


def answers(*rounds: list[str]):
    """A resolver whose n-th lookup answers rounds[n]: a name that changes its answer."""
    remaining = list(rounds)

    async def resolve(host: str, port: int) -> list:
        return [ipaddress.ip_address(address) for address in remaining.pop(0)]

    return resolve


async def test_connection_goes_to_the_address_that_was_checked():
    network = RecordingBackend()
    backend = PublicAddressBackend(EgressPolicy(resolve=answers(["93.184.216.34"])), network)
    await backend.connect_tcp("postiz.example.com", 443)
    assert network.connected_to == ["93.184.216.34"]


async def test_name_that_resolves_to_loopback_at_connection_time_is_refused():
    network = RecordingBackend()
    policy = EgressPolicy(resolve=answers(["93.184.216.34"], ["127.0.0.1"]))
    await policy.public_url("https://postiz.example.com/public/v1", "base_url")
    with pytest.raises(AddressRefused, match="loopback"):
        await PublicAddressBackend(policy, network).connect_tcp("postiz.example.com", 443)
    assert network.connected_to == []


async def test_name_with_any_private_address_among_its_answers_is_refused():
    network = RecordingBackend()
    policy = EgressPolicy(resolve=answers(["93.184.216.34", "169.254.169.254"]))
    with pytest.raises(AddressRefused, match="metadata"):
        await PublicAddressBackend(policy, network).connect_tcp("postiz.example.com", 443)
    assert network.connected_to == []


async def test_address_literal_is_checked_without_resolving():
    network = RecordingBackend()
    policy = EgressPolicy(resolve=answers())
    with pytest.raises(AddressRefused, match="private"):
        await PublicAddressBackend(policy, network).connect_tcp("10.0.0.5", 443)


async def test_trusted_host_is_connected_to_as_named():
    network = RecordingBackend()
    policy = EgressPolicy(trusted_hosts=["postiz.local"], resolve=answers())
    await PublicAddressBackend(policy, network).connect_tcp("postiz.local", 8080)
    assert network.connected_to == ["postiz.local"]


async def test_unix_sockets_are_refused():
    with pytest.raises(AddressRefused):
        await PublicAddressBackend(EgressPolicy()).connect_unix_socket("/var/run/docker.sock")
