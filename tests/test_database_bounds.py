"""Nothing waits on the database forever: a connection is waited for, and each statement runs,
at most the call's remaining deadline and the pool's own bounds; the pool recovers after."""

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import grpc
import pytest
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from services.jobs.service import JOBS
from services.runtime.call_context import profile_scope
from services.runtime.database import TenantScopedPool, create_pool
from services.runtime.errors import DeadlineExceeded, Unavailable
from services.runtime.server import RunningService
from tests.conftest import new_profile_id, running, settings_for

Code = grpc.StatusCode
PoolFactory = Callable[..., AsyncIterator[TenantScopedPool]]


@pytest.fixture
def one_connection_pool(jobs_service: RunningService, database_url: str) -> PoolFactory:
    """A TenantScopedPool of one connection, as the Jobs service's role (its migrations run)."""

    @asynccontextmanager
    async def pool(**bounds: float) -> AsyncIterator[TenantScopedPool]:
        raw = await create_pool(database_url, min_size=1, max_size=1)
        try:
            yield TenantScopedPool(raw, JOBS.database_role, **bounds)
        finally:
            await raw.close()

    return pool


async def _recovered(pool: TenantScopedPool) -> None:
    """The pool serves a transaction again, with nothing left in use."""
    profile = new_profile_id()
    with profile_scope(profile):
        async with pool.transaction(profile) as connection:
            assert await connection.fetchval("SELECT 1") == 1
    assert pool.usage()["in_use"] == 0


async def test_waiting_for_a_connection_ends_at_the_calls_deadline(one_connection_pool):
    async with one_connection_pool() as pool:
        held = await pool.pool.acquire()
        started = time.perf_counter()
        profile = new_profile_id()
        with (
            profile_scope(profile, time_remaining=0.2),
            pytest.raises(DeadlineExceeded),
        ):
            async with pool.transaction(profile):
                pass
        elapsed = time.perf_counter() - started
        await pool.pool.release(held)
        await _recovered(pool)
    assert 0.15 <= elapsed < 2


async def test_waiting_for_a_connection_ends_busy_after_the_acquire_timeout(one_connection_pool):
    async with one_connection_pool(acquire_timeout_seconds=0.2) as pool:
        held = await pool.pool.acquire()
        profile = new_profile_id()
        with (
            profile_scope(profile),
            pytest.raises(Unavailable, match="busy") as busy,
        ):
            async with pool.transaction(profile):
                pass
        await pool.pool.release(held)
        await _recovered(pool)
    assert not isinstance(busy.value, DeadlineExceeded)


async def test_a_statement_running_past_the_deadline_is_cancelled_at_it(one_connection_pool):
    async with one_connection_pool() as pool:
        started = time.perf_counter()
        profile = new_profile_id()
        with (
            profile_scope(profile, time_remaining=0.5),
            pytest.raises(DeadlineExceeded),
        ):
            async with pool.transaction(profile) as connection:
                await connection.execute("SELECT pg_sleep(5)")
        elapsed = time.perf_counter() - started
        await _recovered(pool)
    assert 0.45 <= elapsed < 2.5


async def test_a_statement_running_past_the_statement_timeout_is_unavailable(
    one_connection_pool,
):
    async with one_connection_pool(statement_timeout_seconds=0.3) as pool:
        profile = new_profile_id()
        scope = profile_scope(profile, time_remaining=30)
        with scope, pytest.raises(Unavailable, match=r"longer than 0\.3s") as slow:
            async with pool.transaction(profile) as connection:
                await connection.execute("SELECT pg_sleep(5)")
        await _recovered(pool)
    assert not isinstance(slow.value, DeadlineExceeded)


@pytest.mark.parametrize(("time_remaining", "most_ms"), [(2.0, 2000), (None, 10_000)])
async def test_each_transaction_runs_under_the_deadline_capped_by_the_statement_timeout(
    one_connection_pool, time_remaining, most_ms
):
    async with one_connection_pool(statement_timeout_seconds=10) as pool:
        profile = new_profile_id()
        with profile_scope(profile, time_remaining=time_remaining):
            async with pool.transaction(profile) as connection:
                timeout_ms = int(
                    await connection.fetchval(
                        "SELECT setting FROM pg_settings WHERE name = 'statement_timeout'"
                    )
                )
    assert most_ms - 1000 < timeout_ms <= most_ms


@pytest.fixture(scope="module")
async def one_connection_jobs(database_url: str) -> AsyncIterator[RunningService]:
    """A Jobs service with one database connection, waited for at most 0.3 s."""
    settings = settings_for(database_url, db_pool_max_size=1, db_acquire_timeout_seconds=0.3)
    async with running(JOBS, settings) as service:
        yield service


@pytest.mark.parametrize(
    ("deadline", "code"), [(0.3, Code.DEADLINE_EXCEEDED), (10, Code.UNAVAILABLE)]
)
async def test_a_call_while_every_connection_is_held_ends_promptly_and_the_pool_recovers(
    one_connection_jobs, deadline, code
):
    """The call's own deadline, or the acquire timeout when it is the shorter."""
    metadata = (("x-profile-id", new_profile_id()),)
    request = jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{one_connection_jobs.port}") as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        held = await one_connection_jobs.pool.pool.acquire()
        started = time.perf_counter()
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await jobs.CreateJob(request, metadata=metadata, timeout=deadline)
            elapsed = time.perf_counter() - started
        finally:
            await one_connection_jobs.pool.pool.release(held)
        created = await jobs.CreateJob(request, metadata=metadata, timeout=10)
    assert refused.value.code() == code, refused.value.details()
    assert elapsed < 2.5
    assert created.job_id
