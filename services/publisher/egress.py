"""Where the Publisher may send a request, and the network backend that holds it to that.

A profile names its own Postiz (`base_url`) and URLs Postiz fetches for it, so every such URL
must be https on a public address: never loopback, private, link-local, CGNAT, multicast,
reserved or a cloud metadata address, which would let a profile reach inside the cluster.
Names are checked when a URL is given, and again when a connection is made: the backend
resolves the name itself, checks every address and connects to a checked one, so a name that
resolves elsewhere later (DNS rebinding) is still refused. Hosts named as trusted (a local
fake Postiz) are exempt from both rules; the allow-list, when set, is the only Postiz hosts a
base_url may name.
"""

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import SplitResult, urlsplit, urlunsplit

import httpcore

from services.runtime.errors import InvalidArgument, Unavailable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str, int], Awaitable[list[IPAddress]]]

CLOUD_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata"})
CLOUD_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # CGNAT, RFC 6598
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: an IPv4 address in IPv6 clothes

POSTIZ_ROOT_EXAMPLE = (
    "base_url must be the Postiz public API root, for example "
    "https://api.postiz.com/public/v1 or https://postiz.example.com/api/public/v1"
)


class AddressRefused(InvalidArgument):
    """The URL names, or its host resolves to, an address the Publisher may not call. Raised
    before anything is sent."""


def _embedded_ipv4(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, NAT64), which is where it goes."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def non_public_kind(address: IPAddress) -> str | None:
    """What makes the address unfit to call ("loopback", "private", ...), or None when it is
    a public unicast address."""
    address = _embedded_ipv4(address)
    if address in CLOUD_METADATA_ADDRESSES:
        return "a cloud metadata address"
    for kind, matches in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("shared (CGNAT)", address in _SHARED_ADDRESS_SPACE),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("not globally routable", not address.is_global),
    ):
        if matches:
            return kind
    return None


async def resolve_with_system(host: str, port: int) -> list[IPAddress]:
    """Every address the system resolver gives for host, in its order."""
    answers = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(answer[4][0]) for answer in answers))


def _hosts(names: Iterable[str]) -> frozenset[str]:
    return frozenset(filter(None, (_host(name) for name in names)))


def _host(name: str) -> str:
    """A host as compared here: lower case, no trailing dot, no IPv6 brackets."""
    return name.strip().lower().rstrip(".").strip("[]")


class EgressPolicy:
    """The hosts the Publisher may call, and the resolver it checks them with."""

    def __init__(
        self,
        trusted_hosts: Iterable[str] = (),
        allowed_postiz_hosts: Iterable[str] = (),
        resolve: Resolve = resolve_with_system,
    ) -> None:
        self.trusted_hosts = _hosts(trusted_hosts)
        self.allowed_postiz_hosts = _hosts(allowed_postiz_hosts)
        self._resolve = resolve

    def is_trusted(self, host: str) -> bool:
        return _host(host) in self.trusted_hosts

    def postiz_base_url(self, base_url: str) -> str:
        """The Postiz public API root, checked and without its trailing slash."""
        parts = self._checked(base_url, "base_url", POSTIZ_ROOT_EXAMPLE)
        if parts.query or parts.fragment:
            raise InvalidArgument(POSTIZ_ROOT_EXAMPLE)
        host = _host(parts.hostname or "")
        if self.allowed_postiz_hosts and host not in self.allowed_postiz_hosts:
            raise AddressRefused(
                f"base_url host {host!r} is not an allowed Postiz host; allowed: "
                f"{', '.join(sorted(self.allowed_postiz_hosts))}"
            )
        return urlunsplit(parts._replace(path=parts.path.rstrip("/")))

    async def public_url(self, url: str, field: str) -> str:
        """A URL handed on for Postiz to fetch, checked as if the Publisher called it: https,
        and every address its host resolves to public (unless the host is trusted)."""
        parts = self._checked(url, field, f"{field} must be an https URL")
        host = parts.hostname or ""
        if not self.is_trusted(host):
            try:
                await self.public_addresses(host, parts.port or 443)
            except socket.gaierror as error:
                if error.errno == socket.EAI_AGAIN:
                    raise Unavailable(f"{field} host {host!r} cannot be resolved now") from None
                raise InvalidArgument(f"{field} host {host!r} does not resolve") from None
        return url

    async def public_addresses(self, host: str, port: int) -> list[IPAddress]:
        """Every address host resolves to, once each has been found public; AddressRefused
        otherwise. socket.gaierror when host does not resolve."""
        try:
            addresses = [ipaddress.ip_address(_host(host))]
        except ValueError:
            addresses = await self._resolve(host, port)
        for address in addresses:
            kind = non_public_kind(address)
            if kind is not None:
                raise AddressRefused(
                    f"{host!r} resolves to {address}, {kind}: the Publisher calls public "
                    "addresses only"
                )
        return addresses

    def _checked(self, url: str, field: str, how_to: str) -> SplitResult:
        """The URL's parts once it is http(s) with a host and no credentials, https unless its
        host is trusted, and not naming a metadata or non-public address outright."""
        parts = urlsplit(url.strip())
        try:
            parts.port  # noqa: B018 - raises ValueError for a port out of range
        except ValueError:
            raise InvalidArgument(how_to) from None
        host = _host(parts.hostname or "")
        if parts.scheme not in ("http", "https") or not host or parts.username or parts.password:
            raise InvalidArgument(how_to)
        if self.is_trusted(host):
            return parts
        if parts.scheme != "https":
            raise AddressRefused(f"{field} must use https (host {host!r} is not trusted)")
        if host in CLOUD_METADATA_HOSTS:
            raise AddressRefused(f"{field} names a cloud metadata host: {host!r}")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return parts
        kind = non_public_kind(address)
        if kind is not None:
            raise AddressRefused(f"{field} names {address}, {kind}: only public hosts are called")
        return parts


class PublicAddressBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network, but only to addresses the policy allows.

    Resolves the name itself, refuses the connection (AddressRefused) unless every address
    is public, and connects to a checked address, so what was checked is what is connected
    to. httpcore still gives the name to TLS (SNI, certificate check), and the request keeps
    it in its Host header. A trusted host is connected to as asked.
    """

    def __init__(
        self, policy: EgressPolicy, inner: httpcore.AsyncNetworkBackend | None = None
    ) -> None:
        self._policy = policy
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if self._policy.is_trusted(host):
            return await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        try:
            async with asyncio.timeout(timeout):
                addresses = await self._policy.public_addresses(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host!r} took too long") from None
        except OSError as error:
            raise httpcore.ConnectError(f"cannot resolve {host!r}: {error}") from None
        failure: Exception = httpcore.ConnectError(f"{host!r} has no address")
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                failure = error
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise AddressRefused("the Publisher does not call Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
