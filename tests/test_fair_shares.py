"""Each profile's fair share of a replica: its calls in flight and its response streams are
limited per profile, so one profile's burst is refused (or waits behind its own calls) while
every other profile is served."""

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

import suite_client
from services.jobs.service import JOBS
from services.runtime.interceptors import ProfileInterceptor
from services.runtime.interceptors.handlers import InterceptorChain
from services.runtime.server import new_server
from services.runtime.shares import RETRY_AFTER_SECONDS, ProfileShares
from tests.conftest import as_profile, new_profile_id, running, settings_for

Code = grpc.StatusCode
HOLD = "/test.Service/Hold"  # waits at the gate
ECHO = "/test.Service/Echo"  # answers at once
WATCH = "/test.Service/Watch"  # a response stream: one message, then waits at the gate
ALL = "/test.Service/All"  # a cross-profile read that waits at the gate


class Gate:
    """Handlers that wait until the test opens the gate; `entered` hears of each arrival."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.entered: asyncio.Queue[bytes] = asyncio.Queue()

    async def hold(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.entered.put_nowait(request)
        await self.opened.wait()
        return request

    async def watch(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator:
        yield request
        await self.opened.wait()


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


@dataclass
class Served:
    channel: grpc.aio.Channel
    interceptor: ProfileInterceptor
    gate: Gate

    def call(self, method: str, profile_id: str | None = None, **options: object):
        metadata = () if profile_id is None else as_profile(profile_id)
        return self.channel.unary_unary(method)(b"x", metadata=metadata, **options)

    async def held(self, method: str, profile_id: str | None, count: int) -> list[asyncio.Task]:
        """`count` calls that have reached the handler and wait at the gate."""
        calls = [asyncio.ensure_future(self.call(method, profile_id)) for _ in range(count)]
        for _ in range(count):
            await self.gate.entered.get()
        return calls


@asynccontextmanager
async def serving(calls: int = 0, queue_seconds: float = 0.0, streams: int = 0):
    """test.Service behind the profile interceptor with these shares; ALL reads across
    profiles (AUTH_MODE=none: anyone may)."""
    gate = Gate()
    interceptor = ProfileInterceptor(
        cross_profile_methods=frozenset({ALL}),
        calls=ProfileShares(calls, queue_seconds),
        streams=ProfileShares(streams, what="streams open"),
    )
    server, handlers = new_server(InterceptorChain(interceptor))
    handlers.add_registered_method_handlers(
        "test.Service",
        {
            "Hold": grpc.unary_unary_rpc_method_handler(gate.hold),
            "All": grpc.unary_unary_rpc_method_handler(gate.hold),
            "Echo": grpc.unary_unary_rpc_method_handler(_echo),
            "Watch": grpc.unary_stream_rpc_method_handler(gate.watch),
        },
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Served(channel, interceptor, gate)
    finally:
        gate.opened.set()
        await channel.close()
        await server.stop(None)


async def _refusal(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == Code.RESOURCE_EXHAUSTED, raised.value.details()
    return raised.value


async def test_a_call_beyond_its_profiles_share_is_refused_with_a_retry_delay():
    async with serving(calls=2) as served:
        held = await served.held(HOLD, "p1", 2)
        error = await _refusal(served.call(ECHO, "p1"))
        served.gate.opened.set()
        assert await asyncio.gather(*held) == [b"x", b"x"]
    assert suite_client.error_from(ECHO, error).retry_after_seconds == RETRY_AFTER_SECONDS
    assert "2 calls in flight" in error.details()
    assert f"retry in {RETRY_AFTER_SECONDS:g}s" in error.details()


async def test_another_profile_is_served_while_one_is_at_its_limit():
    async with serving(calls=2) as served:
        await served.held(HOLD, "p1", 2)
        assert await served.call(ECHO, "p2") == b"x"
        await _refusal(served.call(ECHO, "p1"))


async def test_a_call_beyond_the_share_waits_for_a_slot_of_its_own_profile():
    async with serving(calls=1, queue_seconds=30) as served:
        held = await served.held(HOLD, "p1", 1)
        waiting = asyncio.ensure_future(served.call(ECHO, "p1"))
        assert await served.call(ECHO, "p2") == b"x"  # not behind p1's queue
        assert not waiting.done()
        served.gate.opened.set()
        assert await waiting == b"x"
        assert await held[0] == b"x"


async def test_a_waiting_call_is_refused_once_the_queue_time_has_passed():
    async with serving(calls=1, queue_seconds=0.05) as served:
        await served.held(HOLD, "p1", 1)
        started = time.perf_counter()
        await _refusal(served.call(ECHO, "p1"))
    assert time.perf_counter() - started >= 0.05


async def test_no_more_calls_wait_than_the_share_holds():
    async with serving(calls=1, queue_seconds=30) as served:
        await served.held(HOLD, "p1", 1)
        waiting = asyncio.ensure_future(served.call(ECHO, "p1"))
        started = time.perf_counter()
        await _refusal(served.call(ECHO, "p1"))
        assert time.perf_counter() - started < 5  # refused at once, not after the queue time
        served.gate.opened.set()
        assert await waiting == b"x"


async def test_response_streams_have_a_share_of_their_own():
    async with serving(calls=1, streams=1) as served:
        watch = served.channel.unary_stream(WATCH)(b"x", metadata=as_profile("p1"))
        assert await watch.read() == b"x"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in served.channel.unary_stream(WATCH)(b"x", metadata=as_profile("p1")):
                pass
        assert await served.call(ECHO, "p1") == b"x"  # the open stream uses no call slot
        watch.cancel()
    assert refused.value.code() == Code.RESOURCE_EXHAUSTED
    assert "1 streams open" in refused.value.details()


async def test_cross_profile_reads_count_under_one_key_of_their_own():
    async with serving(calls=1) as served:
        await served.held(ALL, None, 1)
        await _refusal(served.call(ALL))
        assert await served.call(ECHO, "p1") == b"x"


async def test_a_profiles_entry_is_dropped_once_its_calls_end():
    async with serving(calls=1, queue_seconds=0.01) as served:
        held = await served.held(HOLD, "p1", 1)
        await _refusal(served.call(ECHO, "p1"))
        assert served.interceptor.calls.profiles() == 1
        served.gate.opened.set()
        await held[0]
        assert await served.call(ECHO, "p2") == b"x"
        assert served.interceptor.calls.profiles() == 0


async def test_a_cancelled_waiter_passes_its_turn_to_the_next():
    shares = ProfileShares(2, queue_seconds=30)
    assert shares.try_enter("p")
    assert shares.try_enter("p")
    first = asyncio.ensure_future(shares.enter_when_free("p"))
    second = asyncio.ensure_future(shares.enter_when_free("p"))
    await asyncio.sleep(0)  # both run up to their wait
    first.cancel()
    shares.leave("p")
    await second
    assert first.cancelled()
    assert shares.in_flight("p") == 2
    shares.leave("p")
    shares.leave("p")
    assert shares.profiles() == 0


async def test_no_limit_counts_nothing():
    shares = ProfileShares(0)
    assert all(shares.try_enter("p") for _ in range(1000))
    assert shares.profiles() == 0


@pytest.fixture(scope="module")
async def small_share_jobs(database_url: str) -> AsyncIterator:
    """A Jobs service that gives each profile 2 calls in flight, and no queue."""
    settings = settings_for(database_url, profile_max_calls_in_flight=2, profile_queue_seconds=0)
    async with running(JOBS, settings) as service:
        yield service


async def test_a_profiles_burst_on_jobs_is_refused_while_another_profile_is_served(
    small_share_jobs, database_url
):
    """Two of the profile's updates wait on a row lock a test transaction holds; its next
    call is refused with the retry delay, another profile's calls are served, and the two
    updates finish once the lock goes."""
    busy, other = as_profile(new_profile_id()), as_profile(new_profile_id())
    mask = field_mask_pb2.FieldMask(paths=["progress"])
    async with suite_client.jobs_channel(f"127.0.0.1:{small_share_jobs.port}") as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        job = await jobs.CreateJob(
            jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k")), metadata=busy
        )
        locker = await asyncpg.connect(database_url)
        try:
            lock = locker.transaction()
            await lock.start()
            await locker.execute("SELECT 1 FROM jobs.jobs WHERE job_id = $1 FOR UPDATE", job.job_id)
            updates = [
                asyncio.ensure_future(
                    jobs.UpdateJob(
                        jobs_pb2.UpdateJobRequest(
                            job=jobs_pb2.Job(job_id=job.job_id, progress=progress), update_mask=mask
                        ),
                        metadata=busy,
                    )
                )
                for progress in (10, 20)
            ]
            async with asyncio.timeout(10):
                await _blocked_on_locks(locker, 2)
            with pytest.raises(suite_client.ResourceExhausted) as refused:
                await jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=busy)
            served = await jobs.CreateJob(
                jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k")), metadata=other
            )
            await lock.rollback()
            await asyncio.gather(*updates)
        finally:
            await locker.close()
    assert refused.value.retry_after_seconds == RETRY_AFTER_SECONDS
    assert served.job_id


async def _blocked_on_locks(connection: asyncpg.Connection, count: int) -> None:
    """Until `count` backends of this database wait for a lock (no event tells of it)."""
    while True:
        # The activity view is read once per transaction, and this one is inside one.
        await connection.execute("SELECT pg_stat_clear_snapshot()")
        waiting = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if waiting >= count:
            return
        await asyncio.sleep(0.01)
