"""The Postiz public API over httpx, one organization (API key) per call.

Every method takes the PostizAccount of the profile it acts for, so a key can only ever be
used for the profile it was read for, and a call uses that profile's own connections
(PostizConnections). Each call is over within a total time limit, body included, and reads at
most a capped number of bytes, uncompressed. Postiz's answers become domain errors here:
401 → FailedPrecondition, 400 → InvalidArgument, 402/403 → FailedPrecondition,
404 → NotFound, 429 → ResourceExhausted, 5xx, timeouts and answers past the cap →
Unavailable; no free connection of the profile's pool → ResourceExhausted. Only a short,
printable part of what Postiz says is passed on. Reads are retried with backoff and jitter;
POST /posts never is, and a POST /posts whose outcome is unknown raises PostOutcomeUnknown.
"""

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
)
from tenacity.wait import wait_random_exponential

from services.publisher.egress import AddressRefused, EgressPolicy
from services.publisher.metrics import POSTIZ_REQUESTS
from services.publisher.model import (
    CreatedPost,
    Integration,
    Media,
    MediaUpload,
    PostizAccount,
    PostizPost,
)
from services.publisher.postiz_connections import PostizConnections
from services.publisher.settings import PostizLimits
from services.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER_SECONDS = 60.0
# How much of Postiz's own explanation an error passes on.
MAX_MESSAGE_CHARACTERS = 200
# An upload may take this much longer per byte than other calls: its body comes from the
# caller at the caller's pace.
MIN_UPLOAD_BYTES_PER_SECOND = 256 * 1024
# How long one attempt to connect may take at most, within the total limit.
CONNECT_SECONDS = 10.0

T = TypeVar("T")


class PostOutcomeUnknown(Unavailable):
    """POST /posts may or may not have created the post (a timeout, a dropped connection, a
    5xx); a retry with the same request_id reconciles before posting again."""


class PostizUnreachable(Unavailable):
    """No connection to Postiz could be made: the request was never sent."""


class PostizBusy(ResourceExhausted):
    """Every connection of the profile's pool stayed busy: the request was never sent."""


class PostizRateLimited(ResourceExhausted):
    """Postiz answered 429; `until` is when it allows posts again."""

    def __init__(self, message: str, retry_after_seconds: float) -> None:
        super().__init__(message, retry_after_seconds)
        self.until = datetime.now(UTC) + timedelta(seconds=retry_after_seconds)


def _printable(text: str, limit: int = MAX_MESSAGE_CHARACTERS) -> str:
    """The text on one line without control characters, cut at limit characters."""
    words = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return words if len(words) <= limit else words[: limit - 1] + "…"


def _content_kind(response: httpx.Response) -> str:
    kind = response.headers.get("content-type", "").split(";")[0]
    return _printable(kind, 64) or "untyped"


def _message(response: httpx.Response) -> str:
    """Postiz's own words (`{msg}` from its handlers, `{message}` text or list from validation,
    `{error}`), printable and short; of any other answer only its content type."""
    try:
        body = response.json()
    except ValueError:
        body = None
    text: Any = None
    if isinstance(body, dict):
        text = body.get("msg") or body.get("message") or body.get("error")
    if isinstance(text, list):
        text = "; ".join(str(item) for item in text[:20])
    if isinstance(text, str) and (words := _printable(text)):
        return words
    return f"its {_content_kind(response)} answer is not shown"


def _answer(response: httpx.Response, parse: Callable[[Any], T]) -> T:
    """What `parse` makes of the JSON answer; Unavailable when it is not the API's shape."""
    try:
        return parse(response.json())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise Unavailable(
            f"Postiz answered {response.status_code} with an answer not in its API's shape "
            f"({_content_kind(response)})"
        ) from None


def _seconds_header(response: httpx.Response, name: str) -> float | None:
    raw = response.headers.get(name)
    if raw is None:
        return None
    try:
        return max(float(raw), 0.0)
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max((moment - datetime.now(UTC)).total_seconds(), 0.0)


def rate_limited_until(response: httpx.Response) -> datetime | None:
    """When a successful POST /posts says the budget is spent (`X-RateLimit-Remaining: 0`),
    the moment it resets."""
    if response.headers.get("x-ratelimit-remaining") != "0":
        return None
    reset = _seconds_header(response, "x-ratelimit-reset")
    return datetime.now(UTC) + timedelta(
        seconds=DEFAULT_RETRY_AFTER_SECONDS if reset is None else reset
    )


def raise_for_postiz_status(response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    message = _message(response)
    if status == 401:
        raise FailedPrecondition(
            f"Postiz rejected this profile's API key ({message}); set a valid key with "
            "SetPostizCredentials"
        )
    if status == 400:
        raise InvalidArgument(f"Postiz refused the request: {message}")
    if status in (402, 403):
        raise FailedPrecondition(f"Postiz refused the request for this organization: {message}")
    if status == 404:
        raise NotFound(f"Postiz has no such resource: {message}")
    if status == 429:
        retry_after = _seconds_header(response, "retry-after")
        if retry_after is None:
            retry_after = _seconds_header(response, "x-ratelimit-reset")
        if retry_after is None:
            retry_after = DEFAULT_RETRY_AFTER_SECONDS
        raise PostizRateLimited(
            f"Postiz rate limit reached for this profile; retry in {retry_after:.0f}s",
            retry_after,
        )
    raise Unavailable(f"Postiz answered {status}: {message}; retry later")


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _integration(item: dict[str, Any]) -> Integration:
    customer = item.get("customer") or {}
    return Integration(
        id=str(item["id"]),
        name=item.get("name") or "",
        identifier=item.get("identifier") or "",
        picture=item.get("picture") or "",
        disabled=bool(item.get("disabled")),
        profile=item.get("profile") or "",
        customer_id=customer.get("id") or "",
        customer_name=customer.get("name") or "",
    )


def _post(item: dict[str, Any]) -> PostizPost:
    integration = item.get("integration") or {}
    images = item.get("image")
    return PostizPost(
        id=str(item["id"]),
        content=item.get("content") or "",
        publish_time=_time(item["publishDate"]),
        release_url=item.get("releaseURL") or "",
        state=item.get("state") or "",
        group=item.get("group") or "",
        integration_id=integration.get("id") or "",
        integration_name=integration.get("name") or "",
        integration_identifier=integration.get("providerIdentifier")
        or integration.get("identifier")
        or "",
        media_ids=(
            frozenset(str(image.get("id")) for image in images if isinstance(image, dict))
            if isinstance(images, list)
            else None
        ),
    )


def _media(item: dict[str, Any]) -> Media:
    return Media(id=str(item["id"]), name=item.get("name") or "", path=item.get("path") or "")


class PostizClient:
    """Calls Postiz for one profile at a time, over that profile's own connections; the key
    goes on each request, never the pool."""

    def __init__(
        self,
        policy: EgressPolicy,
        limits: PostizLimits,
        get_attempts: int,
        retry_base_seconds: float,
    ) -> None:
        # The waits that end with nothing sent stay well inside the total limit, so that
        # they are told apart from a call that ran out of time.
        self._connections = PostizConnections(
            policy,
            connections_per_profile=limits.connections_per_profile,
            pool_wait_seconds=min(limits.pool_wait_seconds, limits.timeout_seconds / 2),
            connect_seconds=min(CONNECT_SECONDS, limits.timeout_seconds / 3),
        )
        self._limits = limits
        self._get_attempts = max(get_attempts, 1)
        self._retry_base_seconds = retry_base_seconds

    async def aclose(self) -> None:
        await self._connections.aclose()

    async def _send(
        self,
        account: PostizAccount,
        method: str,
        path: str,
        *,
        extra_seconds: float = 0.0,
        **kwargs: Any,
    ) -> httpx.Response:
        """The answer, read whole within the time limit (plus extra_seconds); a domain error
        for any status of 400 and more."""
        url = account.base_url.rstrip("/") + path
        headers = {
            "Authorization": account.api_key,
            # Nothing to decompress: a small compressed answer cannot grow past the cap.
            "Accept-Encoding": "identity",
            **kwargs.pop("headers", {}),
        }
        seconds = self._limits.timeout_seconds + extra_seconds
        outcome = "error"
        try:
            async with (
                self._connections.client(account.profile_id, account.base_url) as client,
                asyncio.timeout(seconds),
            ):
                response = await self._exchange(client, method, url, headers, kwargs)
            outcome = str(response.status_code)
        except asyncio.CancelledError:
            outcome = "cancelled"  # the caller gave up
            raise
        except AddressRefused:
            outcome = "refused"
            raise
        except Unavailable:
            outcome = "bad_answer"
            raise
        except TimeoutError:
            outcome = "timeout"
            raise Unavailable(
                f"Postiz at {account.base_url} did not answer within {seconds:g}s"
            ) from None
        except httpx.PoolTimeout:
            outcome = "busy"
            raise PostizBusy(
                f"this profile already has {self._limits.connections_per_profile} calls to "
                "Postiz in flight; retry when one has finished",
                retry_after_seconds=1.0,
            ) from None
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            outcome = "unreachable"
            raise PostizUnreachable(
                f"cannot reach Postiz at {account.base_url}: {type(error).__name__}"
            ) from None
        except httpx.TransportError as error:
            raise Unavailable(
                f"Postiz at {account.base_url} failed: {type(error).__name__}"
            ) from None
        finally:
            POSTIZ_REQUESTS.labels(method, "/" + path.split("/")[1], outcome).inc()
        raise_for_postiz_status(response)
        return response

    async def _exchange(
        self,
        client: httpx.AsyncClient,
        method: str,
        url: str,
        headers: dict[str, str],
        options: dict[str, Any],
    ) -> httpx.Response:
        """Sends the request and reads the answer, at most max_response_bytes of it."""
        cap = self._limits.max_response_bytes
        too_large = f"Postiz answered more than {cap} bytes; the answer was not read"
        async with client.stream(method, url, headers=headers, **options) as streamed:
            encoding = streamed.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise Unavailable(
                    f"Postiz answered {streamed.status_code} encoded as "
                    f"{_printable(encoding, 32)!r} although it was asked for identity"
                )
            declared = streamed.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > cap:
                raise Unavailable(too_large)
            body = bytearray()
            async for chunk in streamed.aiter_raw():
                body += chunk
                if len(body) > cap:
                    raise Unavailable(too_large)
        return httpx.Response(
            streamed.status_code,
            headers=streamed.headers,
            content=bytes(body),
            request=streamed.request,
        )

    async def _get(
        self, account: PostizAccount, path: str, parse: Callable[[Any], T], **params: str
    ) -> T:
        """A read, retried on Unavailable with exponential backoff and full jitter."""
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(self._get_attempts),
            wait=wait_random_exponential(multiplier=self._retry_base_seconds, max=10),
            retry=retry_if_exception_type(Unavailable),
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        ):
            with attempt:
                answer = _answer(await self._send(account, "GET", path, params=params), parse)
        return answer

    async def check_connected(self, account: PostizAccount) -> None:
        """Raises unless Postiz accepts the key."""
        connected = await self._get(
            account, "/is-connected", lambda body: body.get("connected") is True
        )
        if not connected:
            raise FailedPrecondition("Postiz did not confirm the connection for this API key")

    async def list_integrations(self, account: PostizAccount) -> list[Integration]:
        return await self._get(
            account, "/integrations", lambda body: [_integration(item) for item in body]
        )

    async def list_posts(
        self, account: PostizAccount, start: datetime, end: datetime
    ) -> list[PostizPost]:
        return await self._get(
            account,
            "/posts",
            lambda body: [_post(item) for item in body.get("posts", [])],
            startDate=_iso(start),
            endDate=_iso(end),
        )

    async def delete_post(self, account: PostizAccount, post_id: str) -> None:
        """Deletes the post's group. Postiz answers `{error: true}` even when it worked, so
        only the status code is read."""
        await self._send(account, "DELETE", f"/posts/{quote(post_id, safe='')}")

    async def create_post(
        self, account: PostizAccount, body: dict[str, Any]
    ) -> tuple[list[CreatedPost], datetime | None]:
        """The created posts, and when the budget Postiz reported resets if it is spent.

        Never retried, and over within the time limit in total, so that an attempt older than
        that is known not to be in flight. Raises PostOutcomeUnknown when the post may exist
        anyway; a request that never left (PostizUnreachable, PostizBusy, AddressRefused)
        is raised as it is, and can be sent again at once.
        """
        try:
            response = await self._send(account, "POST", "/posts", json=body)
            created = _answer(
                response,
                lambda answer: [
                    CreatedPost(str(item["postId"]), str(item.get("integration", "")))
                    for item in answer
                ],
            )
        except PostizUnreachable:
            raise
        except Unavailable as error:
            raise PostOutcomeUnknown(
                f"{error}; the post may have been created: retry with the same request_id "
                "to find out without posting twice"
            ) from None
        return created, rate_limited_until(response)

    async def upload(
        self, account: PostizAccount, upload: MediaUpload, chunks: AsyncIterator[bytes]
    ) -> Media:
        """Streams the file to POST /upload as multipart without holding it: at most one
        chunk is in memory. Raises InvalidArgument when the chunks do not add up to the
        promised size."""
        boundary = secrets.token_hex(16)
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{upload.safe_filename}"\r\n'
            f"Content-Type: {upload.content_type}\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()

        async def body() -> AsyncIterator[bytes]:
            yield head
            sent = 0
            async for chunk in chunks:
                sent += len(chunk)
                if sent > upload.size_bytes:
                    raise InvalidArgument(f"more than size_bytes={upload.size_bytes} were sent")
                yield chunk
            if sent != upload.size_bytes:
                raise InvalidArgument(
                    f"the upload ended after {sent} of size_bytes={upload.size_bytes} bytes"
                )
            yield tail

        response = await self._send(
            account,
            "POST",
            "/upload",
            extra_seconds=upload.size_bytes / MIN_UPLOAD_BYTES_PER_SECOND,
            content=body(),
            headers={
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Content-Length": str(len(head) + upload.size_bytes + len(tail)),
            },
        )
        return _answer(response, _media)

    async def upload_from_url(self, account: PostizAccount, url: str) -> Media:
        response = await self._send(account, "POST", "/upload-from-url", json={"url": url})
        return _answer(response, _media)
