"""Each profile's calls a second (runtime.call_rates): a profile past its rate waits briefly or
is refused before its request is decoded, with a retry delay spread over a second, while
another profile is served at once."""

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
from prometheus_client import REGISTRY

import suite_client
from services.runtime.call_rates import MIN_RETRY_SECONDS, ProfileCallRates
from services.runtime.errors import ResourceExhausted
from services.runtime.interceptors.server import ProfileInterceptor, RefusalLines
from services.runtime.settings import Settings
from tests.conftest import as_profile, serving_test_service

ECHO = "/test.Service/Echo"


def test_a_burst_passes_at_once_and_then_calls_pass_at_the_rate():
    rates = ProfileCallRates(rate=10, burst=3, max_wait=1.0)
    assert [rates.reserve("p1") for _ in range(3)] == [0, 0, 0]
    waits = [rates.reserve("p1") for _ in range(3)]
    # Each call past the burst waits one interval (0.1 s) more than the one before.
    assert waits == pytest.approx([0.1, 0.2, 0.3], abs=0.01)
    assert rates.reserve("p2") == 0


def test_a_call_that_would_wait_too_long_is_refused_and_takes_no_token():
    rates = ProfileCallRates(rate=10, burst=1, max_wait=0.15)
    rates.reserve("busy")
    assert rates.reserve("busy") == pytest.approx(0.1, abs=0.01)
    with pytest.raises(ResourceExhausted, match="PROFILE_CALLS_PER_SECOND") as refused:
        rates.reserve("busy")
    delay = refused.value.retry_after_seconds
    assert MIN_RETRY_SECONDS <= delay <= MIN_RETRY_SECONDS + 1
    # The refused call reserved nothing: 0.1 s later the next call waits 0.1 s, not 0.2 s.
    time.sleep(0.1)
    assert rates.reserve("busy") == pytest.approx(0.1, abs=0.02)


def test_refusals_of_a_burst_are_told_different_delays():
    rates = ProfileCallRates(rate=1, burst=1, max_wait=0)
    rates.reserve("busy")
    delays = set()
    for _ in range(20):
        with pytest.raises(ResourceExhausted) as refused:
            rates.reserve("busy")
        delays.add(refused.value.retry_after_seconds)
    assert len(delays) > 10


def test_a_call_never_waits_past_its_deadline():
    rates = ProfileCallRates(rate=10, burst=1, max_wait=1.0)
    rates.reserve("busy")
    with pytest.raises(ResourceExhausted):
        rates.reserve("busy", deadline_seconds=0.05)
    assert rates.reserve("busy", deadline_seconds=0.5) == pytest.approx(0.1, abs=0.01)


def test_no_rate_is_no_limit():
    rates = ProfileCallRates(rate=0, burst=0, max_wait=0)
    assert all(rates.reserve("p1") == 0 for _ in range(10_000))
    assert rates.profiles() == 0


def test_full_buckets_are_forgotten_and_pruning_stays_rare_with_many_profiles():
    rates = ProfileCallRates(rate=1_000_000, burst=1, max_wait=0)
    for n in range(5000):
        rates.reserve(f"p{n}")  # each bucket is full again a microsecond later
    assert rates.profiles() < 2048
    busy = ProfileCallRates(rate=1, burst=1, max_wait=0)
    for n in range(3000):
        busy.reserve(f"p{n}")  # every one empty for a second: none can be forgotten
    assert busy.profiles() == 3000


def test_the_settings_give_a_rate_and_refuse_a_negative_one(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://localhost/x")
    monkeypatch.setenv("PROFILE_CALLS_PER_SECOND", "7")
    monkeypatch.setenv("PROFILE_CALLS_BURST", "9")
    settings = Settings.from_environment(50051)
    assert (settings.profile_calls_per_second, settings.profile_calls_burst) == (7, 9)
    monkeypatch.setenv("PROFILE_CALLS_PER_SECOND", "-1")
    with pytest.raises(SystemExit, match="PROFILE_CALLS_PER_SECOND"):
        Settings.from_environment(50051)


@asynccontextmanager
async def serving(rates: ProfileCallRates) -> AsyncIterator[tuple[grpc.aio.Channel, list]]:
    """An echo service behind the profile interceptor with this call rate; the list holds
    every request its deserializer decoded."""
    decoded: list[bytes] = []

    def deserialize(data: bytes) -> bytes:
        decoded.append(data)
        return data

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    handler = grpc.unary_unary_rpc_method_handler(echo, request_deserializer=deserialize)
    interceptor = ProfileInterceptor(call_rates=rates)
    async with serving_test_service(interceptor, {"Echo": handler}) as channel:
        yield channel, decoded


async def test_a_profile_past_its_rate_is_refused_undecoded_and_another_is_served():
    async with serving(ProfileCallRates(rate=1, burst=2, max_wait=0)) as (channel, decoded):
        echo = channel.unary_unary(ECHO)
        busy, quiet = as_profile("store-busy"), as_profile("store-quiet")
        assert await asyncio.gather(*(echo(b"x", metadata=busy) for _ in range(2))) == [b"x"] * 2
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await echo(b"refused", metadata=busy)
        assert await echo(b"y", metadata=quiet) == b"y"
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "PROFILE_CALLS_PER_SECOND" in refused.value.details()
    delay = suite_client.error_from(ECHO, refused.value).retry_after_seconds
    assert delay is not None
    assert MIN_RETRY_SECONDS <= delay <= MIN_RETRY_SECONDS + 1
    assert b"refused" not in decoded
    assert decoded.count(b"x") == 2


async def test_a_call_within_the_wait_is_served_once_its_token_comes():
    async with serving(ProfileCallRates(rate=10, burst=1, max_wait=0.5)) as (channel, _):
        echo = channel.unary_unary(ECHO)
        busy = as_profile("store-busy")
        started = time.monotonic()
        replies = await asyncio.gather(*(echo(b"x", metadata=busy) for _ in range(3)))
        elapsed = time.monotonic() - started
    assert replies == [b"x"] * 3
    assert elapsed >= 0.18  # the second and third waited 0.1 s and 0.2 s for their tokens


async def test_a_flood_of_refusals_writes_one_access_line_a_second_and_counts_them_all(
    caplog,
):
    method = "/test.Service/Echo"
    handled = {
        "grpc_type": "unary",
        "grpc_service": "test.Service",
        "grpc_method": "Echo",
        "grpc_code": "RESOURCE_EXHAUSTED",
    }
    before = REGISTRY.get_sample_value("grpc_server_handled_total", handled) or 0
    profile = as_profile(f"store-flood-{uuid.uuid4().hex[:8]}")
    async with serving(ProfileCallRates(rate=1e-6, burst=1, max_wait=0)) as (channel, _):
        echo = channel.unary_unary(method)
        await echo(b"x", metadata=profile)
        with caplog.at_level(logging.INFO, logger="services.access"):
            for _ in range(30):
                with pytest.raises(grpc.aio.AioRpcError):
                    await echo(b"x", metadata=profile)
    lines = [
        r
        for r in caplog.records
        if r.name == "services.access" and "RESOURCE_EXHAUSTED" in r.getMessage()
    ]
    assert len(lines) == 1
    counted = REGISTRY.get_sample_value("grpc_server_handled_total", handled) - before
    assert counted == 30


def test_the_line_after_a_quiet_second_says_how_many_refusals_went_unwritten():
    lines = RefusalLines(seconds=0.05)
    key = ("store-1", "/x.Y/Z")
    assert lines.admit(key) == 0
    assert [lines.admit(key) for _ in range(5)] == [None] * 5
    assert lines.admit(("store-2", "/x.Y/Z")) == 0  # another profile has lines of its own
    time.sleep(0.06)
    assert lines.admit(key) == 5
