"""The metering library drives the real elevenlabs and google-genai SDKs against loopback
fakes of the providers' HTTP APIs and records what each call used through the Costs service."""

import json
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from costs.v1 import costs_pb2, costs_pb2_grpc
from elevenlabs.client import AsyncElevenLabs
from google import genai
from google.genai import types

from services.costs.metering import Metering, costs_channel
from services.runtime.call_context import profile_scope
from tests.conftest import new_profile_id

AUDIO = b"ID3-fake-mp3-bytes" * 100


class FakeProviders(BaseHTTPRequestHandler):
    """ElevenLabs text-to-speech and Gemini generateContent, as their APIs answer."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.path.startswith("/v1/text-to-speech/"):
            self.send_response(200)
            self.send_header("content-type", "audio/mpeg")
            self.send_header("content-length", str(len(AUDIO)))
            self.send_header("character-cost", str(len(body["text"])))
            self.send_header("request-id", "el-request-1")
            self.end_headers()
            self.wfile.write(AUDIO)
            return
        if self.path.endswith(":generateContent"):
            answer = json.dumps(
                {
                    "candidates": [{"content": {"role": "model", "parts": [{"text": "A cat."}]}}],
                    "usageMetadata": {
                        "promptTokenCount": 1_000_000,
                        "candidatesTokenCount": 100_000,
                        "thoughtsTokenCount": 300_000,
                        "cachedContentTokenCount": 200_000,
                        "promptTokensDetails": [
                            {"modality": "TEXT", "tokenCount": 700_000},
                            {"modality": "AUDIO", "tokenCount": 300_000},
                        ],
                        "totalTokenCount": 1_400_000,
                    },
                    "modelVersion": "gemini-2.5-flash",
                    "responseId": "gemini-response-1",
                }
            ).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
            return
        self.send_error(404)

    def log_message(self, *args: object) -> None:
        """Quiet: the test output is for failures."""


@contextmanager
def fake_providers() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeProviders)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def provider_url() -> Iterator[str]:
    with fake_providers() as url:
        yield url


@pytest.fixture
async def metering(costs_service) -> AsyncIterator[Metering]:
    async with costs_channel(f"127.0.0.1:{costs_service.port}") as channel:
        yield Metering(costs_pb2_grpc.CostServiceStub(channel))


@pytest.fixture
def profile_id() -> Iterator[str]:
    profile_id = new_profile_id()
    with profile_scope(profile_id):
        yield profile_id


async def entries(costs_stub, profile_id: str) -> list[costs_pb2.CostEntry]:
    listed = await costs_stub.ListCostEntries(
        costs_pb2.ListCostEntriesRequest(), metadata=(("x-profile-id", profile_id),)
    )
    return list(listed.entries)


async def test_elevenlabs_call_is_recorded_under_its_request_id_with_its_character_cost(
    metering, provider_url, profile_id, costs_stub
):
    client = AsyncElevenLabs(api_key="test-key", base_url=provider_url)
    text = "Hello from the pipeline. " * 10
    audio = await metering.elevenlabs_tts(
        client, voice_id="voice-1", text=text, model_id="eleven_multilingual_v2"
    )
    assert audio == AUDIO
    [entry] = await entries(costs_stub, profile_id)
    assert entry.request_id == "el-request-1"
    assert entry.usage["characters"] == entry.usage["credits_charged"] == str(len(text))
    assert Decimal(entry.cost_usd) == Decimal(len(text)) * Decimal("0.0001")
    assert entry.attributes["voice_id"] == "voice-1"


async def test_gemini_call_is_recorded_with_thinking_cached_and_audio_tokens(
    metering, provider_url, profile_id, costs_stub
):
    client = genai.Client(api_key="test-key", http_options=types.HttpOptions(base_url=provider_url))
    response = await metering.gemini_generate_content(
        client, model="gemini-2.5-flash", contents="Describe the frame.", frames_analyzed=12
    )
    assert response.text == "A cat."
    [entry] = await entries(costs_stub, profile_id)
    assert entry.request_id == "gemini-response-1"
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
    metering, provider_url, profile_id, costs_stub
):
    client = genai.Client(api_key="test-key", http_options=types.HttpOptions(base_url=provider_url))
    response = await metering.gemini_generate_content(
        client, model="gemini-2.5-flash", contents="Describe the frame."
    )
    await metering.record_gemini(response, model="gemini-2.5-flash")
    assert len(await entries(costs_stub, profile_id)) == 1


async def test_legacy_sdk_response_is_metered_by_the_shared_field_names(
    metering, profile_id, costs_stub
):
    """google-generativeai's response has the same usage_metadata names and no response id."""
    legacy_response = SimpleNamespace(
        usage_metadata=SimpleNamespace(
            prompt_token_count=1000,
            candidates_token_count=200,
            thoughts_token_count=0,
            cached_content_token_count=0,
        )
    )
    await metering.record_gemini(legacy_response, model="models/gemini-2.0-flash")
    [entry] = await entries(costs_stub, profile_id)
    assert entry.model == "gemini-2.0-flash"
    assert Decimal(entry.cost_usd) == Decimal("0.0001") + Decimal("0.00008")
