"""The Publisher's connections to Postiz: a small pool of its own for each profile and Postiz
host, so that one profile's slow or hostile Postiz ties up that profile's connections only.

Every pool connects through PublicAddressBackend. The pools are kept in a bounded LRU; a pool
is closed when it is evicted with no call in flight.
"""

import ssl
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpcore
import httpx

from services.publisher.egress import EgressPolicy, PublicAddressBackend

# Beyond this many (profile, host) pools the least recently used idle ones are closed.
MAX_POOLS = 256
# Idle connections a pool keeps open for its next calls.
KEEPALIVE_CONNECTIONS = 2


class _PublicAddressTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport over a pool that connects through PublicAddressBackend.

    httpx 0.28 takes no network backend (encode/httpx#3180), so the pool it builds is replaced
    by one that does; requests, responses and errors are handled by httpx as usual.
    """

    def __init__(
        self, backend: PublicAddressBackend, limits: httpx.Limits, ssl_context: ssl.SSLContext
    ) -> None:
        super().__init__(verify=ssl_context, limits=limits)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            # Retries failed connections only: the request was never sent.
            retries=2,
            network_backend=backend,
        )


@dataclass(eq=False)
class _Pool:
    client: httpx.AsyncClient
    in_flight: int = field(default=0)


class PostizConnections:
    """An httpx client for each (profile, Postiz origin), at most `connections_per_profile`
    connections each; a call waits `pool_wait_seconds` at most for one (httpx.PoolTimeout)."""

    def __init__(
        self,
        policy: EgressPolicy,
        connections_per_profile: int,
        pool_wait_seconds: float,
        connect_seconds: float,
        max_pools: int = MAX_POOLS,
    ) -> None:
        self._backend = PublicAddressBackend(policy)
        # Loading the CA certificates is the costly part of a new pool: done once.
        self._ssl_context = httpx.create_ssl_context()
        self._limits = httpx.Limits(
            max_connections=connections_per_profile,
            max_keepalive_connections=min(KEEPALIVE_CONNECTIONS, connections_per_profile),
        )
        # Reads and writes are bounded by the caller's total time limit; these bound the wait
        # for a connection of the pool and each attempt to connect, after which nothing was
        # sent.
        self._timeout = httpx.Timeout(None, connect=connect_seconds, pool=pool_wait_seconds)
        self._max_pools = max_pools
        self._pools: OrderedDict[tuple[str, str], _Pool] = OrderedDict()

    @asynccontextmanager
    async def client(self, profile_id: str, base_url: str) -> AsyncIterator[httpx.AsyncClient]:
        """The client of this profile's pool for base_url's origin, for the block."""
        url = httpx.URL(base_url)
        key = (profile_id, f"{url.scheme}://{url.netloc.decode('ascii')}")
        pool = self._pools.pop(key, None) or _Pool(self._new_client())
        self._pools[key] = pool
        pool.in_flight += 1
        try:
            await self._evict_idle()
            yield pool.client
        finally:
            pool.in_flight -= 1

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=_PublicAddressTransport(self._backend, self._limits, self._ssl_context),
            timeout=self._timeout,
            follow_redirects=False,
            trust_env=False,
        )

    async def _evict_idle(self) -> None:
        """Closes the least recently used idle pools beyond max_pools; pools with calls in
        flight stay until a later eviction finds them idle."""
        if len(self._pools) <= self._max_pools:
            return
        idle = [key for key, pool in self._pools.items() if not pool.in_flight]
        for key in idle[: max(len(self._pools) - self._max_pools, 0)]:
            await self._pools.pop(key).client.aclose()

    @property
    def pool_count(self) -> int:
        return len(self._pools)

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), OrderedDict()
        for pool in pools:
            await pool.client.aclose()
