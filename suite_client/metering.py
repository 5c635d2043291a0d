"""Metering for the SDK calls that cost money: make the call, then record what it used with
the Costs service, for a profile named explicitly, on the worker's own token.

    async with (
        suite_client.costs_channel("dns:///costs:50052", tls=True) as channel,
        suite_client.Metering(channel, token=read_token, profile_id="store-1") as metering,
    ):
        audio = await metering.elevenlabs_tts(eleven, voice_id=..., text=..., model_id=...)

No usage is lost and none counts twice:
- the provider's own request or response id is the record's request_id, and Costs records a
  request_id once per profile, so a line may be sent any number of times;
- each line is written to a durable local outbox (fsync'd) before it is sent, and leaves it
  once Costs has recorded it. While Costs is unreachable the metered call still returns; the
  outbox is replayed in the background, by `flush()`, and by the next Metering that opens it;
- a line Costs refuses (UNAUTHENTICATED: no token or a bad one; PERMISSION_DENIED: a token not
  for this profile; ...) raises UsageRefused in the worker, and stays in the outbox, since the
  money is spent: flush() sends it again once the cause is fixed;
- the outbox has a cap: past it a metered call raises OutboxFull before calling the provider.
"""

import asyncio
import inspect
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
from costs.v1 import costs_pb2
from costs.v1.costs_pb2_grpc import CostServiceStub
from google.protobuf import json_format
from google.protobuf.message import Message

from services.runtime.call_context import (
    AUTHORIZATION_METADATA_KEY,
    PROFILE_METADATA_KEY,
    current_profile_id,
    validate_profile_id,
)
from suite_client.errors import SuiteError, Unavailable, error_from
from suite_client.usage_outbox import OutboxFull, UsageOutbox, WaitingUsage

log = logging.getLogger(__name__)

DEFAULT_OUTBOX_PATH = ".data/metering/outbox.jsonl"
DEFAULT_OUTBOX_MAX_BYTES = 64 << 20
DEFAULT_RECORD_DEADLINE_SECONDS = 10.0
DEFAULT_REPLAY_SECONDS = 5.0
MAX_REPLAY_SECONDS = 300.0

# A bearer token, or what returns one when a call is about to be made (a refreshing source).
TokenSource = str | Callable[[], str | Awaitable[str]] | None

_REQUESTS: dict[str, type[Message]] = {
    "RecordElevenLabsTTS": costs_pb2.RecordElevenLabsTTSRequest,
    "RecordGeminiUsage": costs_pb2.RecordGeminiUsageRequest,
}


class UsageRefused(SuiteError):
    """Costs refused to record usage of a call that was made (and paid for).

    `code` and `details` say why (UNAUTHENTICATED: give Metering a valid token). The usage
    stays in the outbox and `flush()` sends it again; `result` is what the provider returned
    (None from flush), `usage` the record request.
    """

    def __init__(self, error: SuiteError, usage: Message, result: Any = None) -> None:
        super().__init__(error.method, error.code, error.details)
        self.usage = usage
        self.result = result


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
    response: Any,
    *,
    model: str,
    job_id: str = "",
    frames_analyzed: int = 0,
    lease_id: str = "",
) -> costs_pb2.RecordGeminiUsageRequest:
    """The record for a generate_content response of google-genai or google-generativeai.

    Reads usage_metadata by the field names both SDKs share; the legacy SDK has no response
    id, so its calls get a new id, which the outbox keeps for every later send.
    """
    usage = response.usage_metadata
    prompt_tokens = _count(usage, "prompt_token_count") + _count(
        usage, "tool_use_prompt_token_count"
    )
    return costs_pb2.RecordGeminiUsageRequest(
        request_id=getattr(response, "response_id", None) or f"gemini-{uuid.uuid4()}",
        job_id=job_id,
        lease_id=lease_id,
        model=model.removeprefix("models/"),
        prompt_tokens=prompt_tokens,
        output_tokens=_count(usage, "candidates_token_count"),
        thinking_tokens=_count(usage, "thoughts_token_count"),
        cached_tokens=_count(usage, "cached_content_token_count"),
        audio_input_tokens=_audio_tokens(getattr(usage, "prompt_tokens_details", None)),
        frames_analyzed=frames_analyzed,
    )


class Metering:
    """Wraps the SDK calls that cost money and records their usage with the Costs service.

    `channel`: a suite_client.costs_channel (TLS, retries, deadlines). `token`: the worker's
    JWT (AUTH_MODE=jwt), or a callable returning it, asked before each send; None sends no
    token (AUTH_MODE=none, or inside a served call, whose caller's token is passed on).
    `profile_id`: the profile usage is recorded for, unless a call names its own (falls back
    to the profile_scope in force). The outbox: `outbox_path` (default $METERING_OUTBOX_PATH
    or .data/metering/outbox.jsonl), one per process, and `outbox_max_bytes` (default
    $METERING_OUTBOX_MAX_BYTES or 64 MiB). `deadline_seconds`: each record call's deadline.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        token: TokenSource = None,
        profile_id: str | None = None,
        outbox_path: str | Path | None = None,
        outbox_max_bytes: int | None = None,
        deadline_seconds: float = DEFAULT_RECORD_DEADLINE_SECONDS,
        replay_seconds: float = DEFAULT_REPLAY_SECONDS,
    ) -> None:
        self._costs = CostServiceStub(channel)
        self._token = token
        self._profile_id = validate_profile_id(profile_id) if profile_id else None
        self._outbox = UsageOutbox(
            outbox_path or os.environ.get("METERING_OUTBOX_PATH") or DEFAULT_OUTBOX_PATH,
            outbox_max_bytes
            or int(os.environ.get("METERING_OUTBOX_MAX_BYTES") or DEFAULT_OUTBOX_MAX_BYTES),
        )
        self._deadline_seconds = deadline_seconds
        self._replay_seconds = replay_seconds
        self._sending: set[tuple[str, str]] = set()
        self._replay_wanted = asyncio.Event()
        self._replayer: asyncio.Task[None] | None = None

    def waiting(self) -> int:
        """Usage lines Costs has not confirmed yet."""
        return len(self._outbox.waiting())

    async def __aenter__(self) -> Self:
        self._wake_replayer()  # what a previous run left is sent first
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stops the background replay and releases the outbox; what still waits stays on disk
        for the next Metering on the same path. Does not close the channel."""
        if self._replayer is not None:
            self._replayer.cancel()
            await asyncio.gather(self._replayer, return_exceptions=True)
        if waiting := self.waiting():
            log.warning(
                "%d usage line(s) stay in %s until a Metering opens it again",
                waiting,
                self._outbox.path,
            )
        self._outbox.close()

    async def elevenlabs_tts(
        self,
        client: Any,
        *,
        voice_id: str,
        text: str,
        model_id: str,
        job_id: str = "",
        profile_id: str | None = None,
        lease_id: str = "",
        **options: Any,
    ) -> bytes:
        """`client.text_to_speech.convert` of an AsyncElevenLabs client; returns the audio.

        Records the characters sent and ElevenLabs' `character-cost` header under its
        `request-id` header. A worker on a token of scope worker names the job and the lease
        it holds on it (`job_id`, `lease_id`).
        """
        profile_id = self._profile_for(profile_id)
        self._outbox.check_room()
        async with client.text_to_speech.with_raw_response.convert(
            voice_id, text=text, model_id=model_id, **options
        ) as response:
            audio = b"".join([chunk async for chunk in response.data])
            headers = response.headers
        request = costs_pb2.RecordElevenLabsTTSRequest(
            request_id=headers.get("request-id") or f"elevenlabs-{uuid.uuid4()}",
            job_id=job_id,
            lease_id=lease_id,
            model_id=model_id,
            voice_id=voice_id,
            characters=len(text),
            credits_charged=_int_header(headers, "character-cost"),
            text_preview=text[:100],
        )
        await self._record(profile_id, "RecordElevenLabsTTS", request, audio)
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
        profile_id: str | None = None,
        lease_id: str = "",
    ) -> Any:
        """`client.aio.models.generate_content` of a google-genai client; returns its response."""
        profile_id = self._profile_for(profile_id)
        self._outbox.check_room()
        response = await client.aio.models.generate_content(
            model=model, contents=contents, config=config
        )
        await self.record_gemini(
            response,
            model=model,
            job_id=job_id,
            frames_analyzed=frames_analyzed,
            profile_id=profile_id,
            lease_id=lease_id,
        )
        return response

    async def record_gemini(
        self,
        response: Any,
        *,
        model: str,
        job_id: str = "",
        frames_analyzed: int = 0,
        profile_id: str | None = None,
        lease_id: str = "",
    ) -> None:
        """Records a Gemini response obtained elsewhere (for example from the legacy SDK)."""
        profile_id = self._profile_for(profile_id)
        self._outbox.check_room()
        request = gemini_usage_request(
            response,
            model=model,
            job_id=job_id,
            frames_analyzed=frames_analyzed,
            lease_id=lease_id,
        )
        await self._record(profile_id, "RecordGeminiUsage", request, response)

    async def flush(self) -> None:
        """Sends every waiting line now, each waiting for Costs up to the deadline.

        Returns once the outbox is empty. Otherwise raises, the lines staying in the outbox:
        Unavailable (or DeadlineExceeded) while Costs is unreachable, UsageRefused for a line
        Costs refuses.
        """
        await self._send_waiting(skip_in_flight=False)

    async def drained(self) -> None:
        """Returns once no line waits, sent by the calls themselves or the background replay
        (for example `await asyncio.wait_for(metering.drained(), 30)` before a worker exits)."""
        await self._outbox.emptied()

    def _profile_for(self, profile_id: str | None) -> str:
        """Checked before the provider is called: no money is spent on usage that could not
        be recorded."""
        profile_id = profile_id or self._profile_id or current_profile_id()
        if profile_id is None:
            raise ValueError("no profile to record usage for: pass profile_id")
        return validate_profile_id(profile_id)

    async def _record(self, profile_id: str, method: str, request: Message, result: Any) -> None:
        request.occurred_at.FromDatetime(datetime.now(UTC))  # kept for a later replay
        usage = WaitingUsage(
            profile_id=profile_id,
            request_id=request.request_id,
            method=method,
            request=json_format.MessageToDict(request, preserving_proto_field_name=True),
        )
        await self._outbox.add(usage)
        self._sending.add(usage.key)
        try:
            await self._send(usage, wait_for_ready=False)
        except Unavailable as error:
            log.warning(
                "Costs unreachable (%s); usage %s kept in %s",
                error.code.name,
                usage.request_id,
                self._outbox.path,
            )
        except SuiteError as error:
            raise UsageRefused(error, request, result) from error
        finally:
            self._sending.discard(usage.key)
            self._wake_replayer()  # for this line, if it still waits, or others

    async def _send(self, usage: WaitingUsage, *, wait_for_ready: bool) -> None:
        """One record call for the line; the line leaves the outbox once Costs has it."""
        request = json_format.ParseDict(usage.request, _REQUESTS[usage.method]())
        metadata = [(PROFILE_METADATA_KEY, usage.profile_id)]
        token = self._token() if callable(self._token) else self._token
        if inspect.isawaitable(token):
            token = await token
        if token:
            metadata.append((AUTHORIZATION_METADATA_KEY, f"Bearer {token}"))
        try:
            await getattr(self._costs, usage.method)(
                request,
                metadata=metadata,
                timeout=self._deadline_seconds,
                wait_for_ready=wait_for_ready,
            )
        except grpc.aio.AioRpcError as error:  # a channel without suite_client's interceptors
            raise error_from(f"/costs.v1.CostService/{usage.method}", error) from None
        await self._outbox.remove(usage.key)

    async def _send_waiting(self, *, skip_in_flight: bool) -> None:
        """Sends the waiting lines, oldest first; stops at the first Unavailable (Costs is
        down for the rest too) and raises the first refusal after trying every line."""
        refused: UsageRefused | None = None
        for usage in self._outbox.waiting():
            if skip_in_flight and usage.key in self._sending:
                continue
            try:
                await self._send(usage, wait_for_ready=True)
            except Unavailable:
                raise
            except SuiteError as error:
                request = json_format.ParseDict(usage.request, _REQUESTS[usage.method]())
                refused = refused or UsageRefused(error, request)
        if refused is not None:
            raise refused

    def _wake_replayer(self) -> None:
        if not self._outbox.waiting():
            return
        self._replay_wanted.set()
        if self._replayer is None or self._replayer.done():
            self._replayer = asyncio.create_task(self._replay(), name="metering-outbox-replay")

    async def _replay(self) -> None:
        """Sends waiting lines until none is left, backing off while they cannot be sent."""
        delay = self._replay_seconds
        while True:
            await self._replay_wanted.wait()
            self._replay_wanted.clear()
            while self._outbox.waiting():
                try:
                    await self._send_waiting(skip_in_flight=True)
                    delay = self._replay_seconds
                except Exception as error:  # the lines stay: say why, try again later
                    log.warning(
                        "%d usage line(s) wait in %s (%s); next try in %.1f s",
                        self.waiting(),
                        self._outbox.path,
                        error,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_REPLAY_SECONDS)
                else:
                    if all(usage.key in self._sending for usage in self._outbox.waiting()):
                        break  # only lines being sent by their own calls


__all__ = ["Metering", "OutboxFull", "UsageRefused", "gemini_usage_request"]
