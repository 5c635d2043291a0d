"""Metering for the SDK calls that cost money: make the call, then record what it used through
the Costs service, for the profile of the running call.

The provider's own request or response id becomes the record's request_id, so recording the
same call twice (a retried record, a replayed job step) counts it once. A failure to record is
logged with the full usage and never fails the caller's work: the money is already spent, and
the Costs service spools what it cannot store yet.
"""

import json
import logging
import uuid
from typing import Any

import grpc
from costs.v1 import costs_pb2, costs_pb2_grpc

from services.runtime.interceptors import profile_client_interceptors

log = logging.getLogger(__name__)

# gRPC's own retries, with the same request_id each time, for a Costs replica that is restarting.
_RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "costs.v1.CostService"}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


def costs_channel(target: str) -> grpc.aio.Channel:
    """A channel to the Costs service that sends the current profile and retries UNAVAILABLE."""
    return grpc.aio.insecure_channel(
        target,
        options=[("grpc.service_config", _RETRY_SERVICE_CONFIG), ("grpc.enable_retries", 1)],
        interceptors=profile_client_interceptors(),
    )


def _int_header(headers: Any, name: str) -> int | None:
    value = headers.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _count(usage: Any, name: str) -> int:
    return int(getattr(usage, name, 0) or 0)


def _audio_tokens(details: Any) -> int:
    """Audio tokens among per-modality counts (an enum in either SDK, or its name)."""
    total = 0
    for detail in details or ():
        modality = getattr(detail, "modality", None)
        if str(getattr(modality, "name", modality)).upper().endswith("AUDIO"):
            total += _count(detail, "token_count")
    return total


def gemini_usage_request(
    response: Any, *, model: str, job_id: str = "", frames_analyzed: int = 0
) -> costs_pb2.RecordGeminiUsageRequest:
    """The record for a generate_content response of google-genai or google-generativeai.

    Reads usage_metadata by the field names both SDKs share; the legacy SDK has no response
    id, so its calls are recorded under a new id each time.
    """
    usage = response.usage_metadata
    prompt_tokens = _count(usage, "prompt_token_count") + _count(
        usage, "tool_use_prompt_token_count"
    )
    return costs_pb2.RecordGeminiUsageRequest(
        request_id=getattr(response, "response_id", None) or f"gemini-{uuid.uuid4()}",
        job_id=job_id,
        model=model.removeprefix("models/"),
        prompt_tokens=prompt_tokens,
        output_tokens=_count(usage, "candidates_token_count"),
        thinking_tokens=_count(usage, "thoughts_token_count"),
        cached_tokens=_count(usage, "cached_content_token_count"),
        audio_input_tokens=_audio_tokens(getattr(usage, "prompt_tokens_details", None)),
        frames_analyzed=frames_analyzed,
    )


class Metering:
    """Wraps the SDK calls that cost money. Use it inside a profile's call (profile_scope)."""

    def __init__(self, costs: costs_pb2_grpc.CostServiceStub) -> None:
        self._costs = costs

    async def elevenlabs_tts(
        self,
        client: Any,
        *,
        voice_id: str,
        text: str,
        model_id: str,
        job_id: str = "",
        **options: Any,
    ) -> bytes:
        """`client.text_to_speech.convert` of an AsyncElevenLabs client; returns the audio.

        Records the characters sent and ElevenLabs' `character-cost` header under its
        `request-id` header.
        """
        async with client.text_to_speech.with_raw_response.convert(
            voice_id, text=text, model_id=model_id, **options
        ) as response:
            audio = b"".join([chunk async for chunk in response.data])
            headers = response.headers
        request = costs_pb2.RecordElevenLabsTTSRequest(
            request_id=headers.get("request-id") or f"elevenlabs-{uuid.uuid4()}",
            job_id=job_id,
            model_id=model_id,
            voice_id=voice_id,
            characters=len(text),
            credits_charged=_int_header(headers, "character-cost"),
            text_preview=text[:100],
        )
        await self._record(self._costs.RecordElevenLabsTTS, request)
        return audio

    async def gemini_generate_content(
        self,
        client: Any,
        *,
        model: str,
        contents: Any,
        config: Any = None,
        job_id: str = "",
        frames_analyzed: int = 0,
    ) -> Any:
        """`client.aio.models.generate_content` of a google-genai client; returns its response."""
        response = await client.aio.models.generate_content(
            model=model, contents=contents, config=config
        )
        await self.record_gemini(
            response, model=model, job_id=job_id, frames_analyzed=frames_analyzed
        )
        return response

    async def record_gemini(
        self, response: Any, *, model: str, job_id: str = "", frames_analyzed: int = 0
    ) -> None:
        """Records a Gemini response obtained elsewhere (for example from the legacy SDK)."""
        request = gemini_usage_request(
            response, model=model, job_id=job_id, frames_analyzed=frames_analyzed
        )
        await self._record(self._costs.RecordGeminiUsage, request)

    @staticmethod
    async def _record(method: Any, request: Any) -> None:
        try:
            await method(request)
        except grpc.aio.AioRpcError as error:
            log.error(
                "could not record usage (%s: %s); record it again with this request: %s",
                error.code().name,
                error.details(),
                request,
            )
