"""Each profile's share of the database pool: past it, a profile's transactions wait behind
its own, and another profile still finds a connection."""

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.jobs.service import JOBS
from services.runtime.call_context import profile_scope
from services.runtime.database import TenantScopedPool, create_pool
from services.runtime.errors import Unavailable
from services.runtime.server import RunningService
from tests.conftest import new_profile_id

POOL_SIZE = 4
SHARE = 2


@pytest.fixture
async def shared_pool(jobs_service: RunningService, database_url: str) -> AsyncIterator:
    """A pool of four connections, two a profile, as the Jobs service's role."""
    raw = await create_pool(database_url, min_size=POOL_SIZE, max_size=POOL_SIZE)
    try:
        yield TenantScopedPool(
            raw, JOBS.database_role, acquire_timeout_seconds=0.3, connections_per_profile=SHARE
        )
    finally:
        await raw.close()


async def _hold(pool: TenantScopedPool, profile_id: str, held: asyncio.Event, go: asyncio.Event):
    with profile_scope(profile_id):
        async with pool.transaction(profile_id) as connection:
            await connection.fetchval("SELECT 1")
            held.set()
            await go.wait()


async def test_a_profile_past_its_share_waits_while_another_profile_is_served(shared_pool):
    busy, quiet = new_profile_id(), new_profile_id()
    go = asyncio.Event()
    holders = [asyncio.Event() for _ in range(SHARE + 1)]
    tasks = [asyncio.create_task(_hold(shared_pool, busy, e, go)) for e in holders]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in holders[:SHARE])), 5)
    await asyncio.sleep(0)  # the third has had its turn to ask
    assert not holders[SHARE].is_set()  # beyond its share: waiting, though connections are idle
    assert shared_pool.pool.get_idle_size() == POOL_SIZE - SHARE
    with profile_scope(quiet):
        async with shared_pool.transaction(quiet) as connection:
            assert await connection.fetchval("SELECT 1") == 1
    go.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert holders[SHARE].is_set()  # its own profile's release let it in
    assert shared_pool.shares.profiles() == 0  # no state left for idle profiles


async def test_a_profile_waiting_past_its_share_gets_busy_after_the_acquire_timeout(shared_pool):
    busy = new_profile_id()
    go = asyncio.Event()
    holders = [asyncio.Event() for _ in range(SHARE)]
    tasks = [asyncio.create_task(_hold(shared_pool, busy, e, go)) for e in holders]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in holders)), 5)
    with profile_scope(busy), pytest.raises(Unavailable, match="busy"):
        async with shared_pool.transaction(busy):
            pass
    go.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    with profile_scope(busy):
        async with shared_pool.transaction(busy) as connection:  # its places came back
            assert await connection.fetchval("SELECT 1") == 1
    assert shared_pool.shares.profiles() == 0
