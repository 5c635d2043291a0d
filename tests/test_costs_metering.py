"""Metering (suite_client) drives the real elevenlabs and google-genai SDKs against loopback
fakes of the providers' HTTP APIs and records what each call used with the Costs service: under
AUTH_MODE=jwt on the worker's token, and through its outbox while Costs is down, exactly once."""

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from elevenlabs.client import AsyncElevenLabs
from google import genai
from google.genai import types

import suite_client
from services.costs.service import costs_definition
from services.runtime.server import RunningService
from suite_client import costs_pb2
from tests.conftest import (
    TEST_JWT_SECRET,
    new_profile_id,
    running,
    settings_for,
    signed_in,
    token_for,
)
from tests.fake_providers import AUDIO, CountingServer, fake_providers

# A Costs service that is down answers fast: the channel retries quickly, then gives up.
FAST_RETRY = suite_client.RetryPolicy(max_attempts=3, initial_backoff_seconds=0.01)


@pytest.fixture(scope="module")
def providers() -> Iterator[CountingServer]:
    with fake_providers() as server:
        yield server


@pytest.fixture(scope="module")
def provider_url(providers: CountingServer) -> str:
    return f"http://127.0.0.1:{providers.server_address[1]}"


def elevenlabs_client(provider_url: str) -> AsyncElevenLabs:
    return AsyncElevenLabs(api_key="test-key", base_url=provider_url)


def gemini_client(provider_url: str) -> genai.Client:
    return genai.Client(api_key="test-key", http_options=types.HttpOptions(base_url=provider_url))


def legacy_response() -> SimpleNamespace:
    """google-generativeai's response: the same usage_metadata names, no response id."""
    return SimpleNamespace(
        usage_metadata=SimpleNamespace(
            prompt_token_count=1000,
            candidates_token_count=200,
            thoughts_token_count=0,
            cached_content_token_count=0,
        )
    )


def unused_port() -> int:
    """A loopback port nobody listens on (until a test starts Costs there)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@asynccontextmanager
async def metering_to(
    port: int, outbox: Path, **options: object
) -> AsyncIterator[suite_client.Metering]:
    """A worker's Metering: suite_client's Costs channel, its own outbox."""
    async with (
        suite_client.costs_channel(f"127.0.0.1:{port}", retry=FAST_RETRY) as channel,
        suite_client.Metering(channel, outbox_path=outbox, **options) as metering,
    ):
        yield metering


@asynccontextmanager
async def jwt_costs(
    database_url: str, spool_dir: Path, port: int = 0
) -> AsyncIterator[RunningService]:
    """The Costs service with AUTH_MODE=jwt (HS256, TEST_JWT_SECRET)."""
    definition = costs_definition(spool_path=spool_dir / "spool.jsonl", spool_retry_seconds=0.1)
    settings = settings_for(
        database_url, port=port, auth_mode="jwt", auth_jwt_secret=TEST_JWT_SECRET
    )
    async with running(definition, settings) as service:
        yield service


@pytest.fixture(scope="module")
async def jwt_costs_service(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningService]:
    async with jwt_costs(database_url, tmp_path_factory.mktemp("jwt-costs")) as service:
        yield service


@pytest.fixture
def profile_id() -> str:
    return new_profile_id()


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    return tmp_path / "metering" / "outbox.jsonl"


@pytest.fixture
async def metering(costs_service, profile_id, outbox) -> AsyncIterator[suite_client.Metering]:
    async with metering_to(costs_service.port, outbox, profile_id=profile_id) as metering:
        yield metering


async def entries(port: int, profile_id: str) -> list[costs_pb2.CostEntry]:
    """The profile's recorded lines, read with a token for it (any AUTH_MODE)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        listed = await suite_client.CostServiceStub(channel).ListCostEntries(
            costs_pb2.ListCostEntriesRequest(page_size=500),
            metadata=signed_in(profile_id),
            wait_for_ready=True,  # a Costs just started again: past the reconnect backoff
        )
    return list(listed.entries)


async def test_elevenlabs_call_is_recorded_under_its_request_id_with_its_character_cost(
    metering, providers, provider_url, profile_id, costs_service
):
    text = "Hello from the pipeline. " * 10
    audio = await metering.elevenlabs_tts(
        elevenlabs_client(provider_url),
        voice_id="voice-1",
        text=text,
        model_id="eleven_multilingual_v2",
    )
    assert audio == AUDIO
    [entry] = await entries(costs_service.port, profile_id)
    assert entry.request_id == providers.tts_request_ids[-1]
    assert entry.usage["characters"] == entry.usage["credits_charged"] == str(len(text))
    assert Decimal(entry.cost_usd) == Decimal(len(text)) * Decimal("0.0001")
    assert entry.attributes["voice_id"] == "voice-1"


async def test_gemini_call_is_recorded_with_thinking_cached_and_audio_tokens(
    metering, provider_url, profile_id, costs_service
):
    response = await metering.gemini_generate_content(
        gemini_client(provider_url),
        model="gemini-2.5-flash",
        contents="Describe the frame.",
        frames_analyzed=12,
    )
    assert response.text == "A cat."
    [entry] = await entries(costs_service.port, profile_id)
    assert entry.request_id == response.response_id
    assert dict(entry.usage) == {
        "prompt_tokens": "1000000",
        "output_tokens": "100000",
        "thinking_tokens": "300000",
        "cached_tokens": "200000",
        "audio_input_tokens": "300000",
    }
    # 500K text at $0.30, 200K cached at $0.03, 300K audio at $1.00, 400K output at $2.50.
    assert Decimal(entry.cost_usd) == Decimal("0.15") + Decimal("0.006") + Decimal("0.3") + 1
    assert entry.attributes["frames_analyzed"] == 12


async def test_recording_the_same_gemini_response_twice_counts_once(
    metering, provider_url, profile_id, costs_service
):
    response = await metering.gemini_generate_content(
        gemini_client(provider_url), model="gemini-2.5-flash", contents="Describe the frame."
    )
    await metering.record_gemini(response, model="gemini-2.5-flash")
    assert len(await entries(costs_service.port, profile_id)) == 1


async def test_legacy_sdk_response_is_metered_by_the_shared_field_names(
    metering, profile_id, costs_service
):
    await metering.record_gemini(legacy_response(), model="models/gemini-2.0-flash")
    [entry] = await entries(costs_service.port, profile_id)
    assert entry.model == "gemini-2.0-flash"
    assert Decimal(entry.cost_usd) == Decimal("0.0001") + Decimal("0.00008")


async def test_a_call_names_the_profile_it_records_for(metering, costs_service):
    other = new_profile_id()
    await metering.record_gemini(legacy_response(), model="gemini-2.0-flash", profile_id=other)
    assert len(await entries(costs_service.port, other)) == 1


async def test_without_a_profile_nothing_is_called_and_the_worker_gets_an_error(
    costs_service, outbox, providers, provider_url
):
    calls = providers.calls
    async with metering_to(costs_service.port, outbox) as metering:
        with pytest.raises(ValueError, match="profile_id"):
            await metering.gemini_generate_content(
                gemini_client(provider_url), model="gemini-2.5-flash", contents="Hi."
            )
    assert providers.calls == calls


@pytest.mark.parametrize("provided", [False, True], ids=["token", "token-provider"])
async def test_usage_is_recorded_under_jwt_on_the_workers_token(
    jwt_costs_service, outbox, provider_url, profile_id, provided
):
    token = token_for(profile_id)

    async def provide_token() -> str:  # for example read from a file kept fresh by the platform
        return token

    async with metering_to(
        jwt_costs_service.port,
        outbox,
        token=provide_token if provided else token,
        profile_id=profile_id,
    ) as metering:
        await metering.gemini_generate_content(
            gemini_client(provider_url), model="gemini-2.5-flash", contents="Hi."
        )
        assert metering.waiting() == 0
    assert len(await entries(jwt_costs_service.port, profile_id)) == 1


async def test_without_a_token_under_jwt_the_worker_gets_usage_refused_with_its_audio(
    jwt_costs_service, outbox, provider_url, profile_id
):
    async with metering_to(jwt_costs_service.port, outbox, profile_id=profile_id) as metering:
        with pytest.raises(suite_client.UsageRefused) as refused:
            await metering.elevenlabs_tts(
                elevenlabs_client(provider_url), voice_id="v", text="Hi", model_id="eleven_v3"
            )
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert refused.value.result == AUDIO  # paid for: the worker still gets it
        assert metering.waiting() == 1


async def test_refused_usage_is_recorded_once_a_metering_with_a_valid_token_flushes_it(
    jwt_costs_service, outbox, profile_id
):
    async with metering_to(jwt_costs_service.port, outbox, profile_id=profile_id) as metering:
        with pytest.raises(suite_client.UsageRefused):
            await metering.record_gemini(legacy_response(), model="gemini-2.0-flash")
    token = token_for(profile_id)
    async with metering_to(jwt_costs_service.port, outbox, token=token) as metering:
        await metering.flush()
        assert metering.waiting() == 0
    assert len(await entries(jwt_costs_service.port, profile_id)) == 1


async def test_a_token_for_another_profile_is_refused_as_permission_denied(
    jwt_costs_service, outbox, profile_id
):
    token = token_for(new_profile_id())
    async with metering_to(
        jwt_costs_service.port, outbox, token=token, profile_id=profile_id
    ) as metering:
        with pytest.raises(suite_client.UsageRefused) as refused:
            await metering.record_gemini(legacy_response(), model="gemini-2.0-flash")
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED


async def test_usage_metered_while_costs_is_down_is_recorded_exactly_once_after_it_is_back(
    database_url, tmp_path, outbox, provider_url, profile_id, fault_figures
):
    """Costs up, then stopped, then started again on the same port: every call returns while
    it is down, and flush() lands each line once (the same response metered twice included)."""
    port = unused_port()
    gemini = gemini_client(provider_url)
    token = token_for(profile_id)
    metered: set[str] = set()

    async def meter(count: int) -> list[types.GenerateContentResponse]:
        responses = await asyncio.gather(
            *(
                metering.gemini_generate_content(gemini, model="gemini-2.5-flash", contents="Hi")
                for _ in range(count)
            )
        )
        metered.update(response.response_id for response in responses)
        return responses

    async with metering_to(port, outbox, token=token, profile_id=profile_id) as metering:
        async with jwt_costs(database_url, tmp_path / "first", port):
            await meter(5)
            assert metering.waiting() == 0
        [first, *_] = await meter(20)  # Costs is down: each call returns
        await metering.record_gemini(first, model="gemini-2.5-flash")  # a step run again
        kept = metering.waiting()
        async with jwt_costs(database_url, tmp_path / "second", port) as costs:
            await metering.flush()
            recorded = [entry.request_id for entry in await entries(costs.port, profile_id)]
        assert metering.waiting() == 0
    lost = metered - set(recorded)
    duplicated = len(recorded) - len(set(recorded))
    fault_figures["metering while Costs is down"] = {
        "calls": len(metered) + 1,
        "faults": 1,
        "kept_in_outbox": kept,
        "lost": len(lost),
        "duplicated": duplicated,
    }
    assert kept == 20
    assert not lost
    assert duplicated == 0
    assert outbox.stat().st_size == 0


async def test_usage_waiting_when_a_worker_stops_is_sent_by_the_next_metering_on_its_outbox(
    costs_service, outbox, profile_id
):
    async with metering_to(unused_port(), outbox, profile_id=profile_id) as stopped:
        await stopped.record_gemini(legacy_response(), model="gemini-2.0-flash")
        assert stopped.waiting() == 1
    async with metering_to(costs_service.port, outbox) as restarted:
        assert restarted.waiting() == 1
        await restarted.flush()
    assert len(await entries(costs_service.port, profile_id)) == 1


async def test_waiting_usage_is_replayed_in_the_background_once_costs_is_back(
    database_url, tmp_path, outbox, profile_id
):
    port = unused_port()
    token = token_for(profile_id)
    async with metering_to(
        port, outbox, token=token, profile_id=profile_id, replay_seconds=0.05
    ) as metering:
        await metering.record_gemini(legacy_response(), model="gemini-2.0-flash")
        assert metering.waiting() == 1
        async with jwt_costs(database_url, tmp_path, port) as costs:
            await asyncio.wait_for(metering.drained(), timeout=30)
            assert len(await entries(costs.port, profile_id)) == 1


async def test_flush_while_costs_is_down_raises_unavailable_and_keeps_the_usage(outbox, profile_id):
    async with metering_to(
        unused_port(), outbox, profile_id=profile_id, deadline_seconds=0.2
    ) as metering:
        await metering.record_gemini(legacy_response(), model="gemini-2.0-flash")
        with pytest.raises(suite_client.Unavailable):
            await metering.flush()
        assert metering.waiting() == 1


async def test_past_the_outbox_cap_a_metered_call_raises_before_the_provider_is_called(
    outbox, profile_id, providers, provider_url
):
    gemini = gemini_client(provider_url)
    async with metering_to(
        unused_port(), outbox, profile_id=profile_id, outbox_max_bytes=1
    ) as metering:
        await metering.gemini_generate_content(gemini, model="gemini-2.5-flash", contents="Hi")
        calls = providers.calls
        with pytest.raises(suite_client.OutboxFull):
            await metering.gemini_generate_content(gemini, model="gemini-2.5-flash", contents="Hi")
        assert providers.calls == calls
        assert metering.waiting() == 1


async def test_a_second_metering_on_the_same_outbox_is_refused(outbox, profile_id):
    async with metering_to(unused_port(), outbox, profile_id=profile_id):
        with pytest.raises(suite_client.OutboxInUse):
            async with metering_to(unused_port(), outbox, profile_id=profile_id):
                pass
