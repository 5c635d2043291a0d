"""The Publisher keeps a bounded number of (profile, Postiz host) connection pools, and never
closes one a call is using."""

from services.publisher.egress import EgressPolicy
from services.publisher.postiz_connections import PostizConnections

BASE_URL = "https://postiz.example.com/public/v1"


def connections(max_pools: int) -> PostizConnections:
    return PostizConnections(
        EgressPolicy(),
        connections_per_profile=2,
        pool_wait_seconds=1,
        connect_seconds=1,
        max_pools=max_pools,
    )


async def test_each_profile_gets_a_pool_of_its_own_for_the_same_host():
    pools = connections(max_pools=8)
    async with pools.client("profile-a", BASE_URL) as a, pools.client("profile-b", BASE_URL) as b:
        assert a is not b
    await pools.aclose()


async def test_least_recently_used_idle_pools_beyond_the_bound_are_closed():
    pools = connections(max_pools=2)
    clients = {}
    for profile in ("profile-a", "profile-b", "profile-c"):
        async with pools.client(profile, BASE_URL) as client:
            clients[profile] = client
    assert pools.pool_count == 2
    assert [clients[p].is_closed for p in sorted(clients)] == [True, False, False]
    await pools.aclose()


async def test_a_pool_in_use_is_not_closed_when_the_bound_is_passed():
    pools = connections(max_pools=1)
    async with pools.client("profile-a", BASE_URL) as busy:
        async with pools.client("profile-b", BASE_URL):
            pass
        assert not busy.is_closed
    await pools.aclose()
