"""A fake Postiz public API over real HTTP on loopback, for the tests and for trying the
Publisher locally (`make run` starts one: services/runtime/local_suite.py), faithful to what
the Publisher relies on: the `Authorization: <key>` header (no "Bearer"), one organization per
key, status codes and body shapes (`{msg}` from handlers, `{statusCode, message: [...]}` from
validation), the POST /posts rate limit with `X-RateLimit-*` and `Retry-After`, `DELETE
/posts/:id` answering `{error: true}` when it worked, multipart uploads, a "now" post dated by
Postiz's own clock to the minute, and switches that make POST /posts hang, answer slowly, or
fail half-way after it has stored posts. A hostile or broken Postiz is played by answering a
request with any response (`answer_once_with`: a dribbled, huge or HTML answer) or by holding
every request of an organization until released (`stall`). (GET /posts here also lists each
post's `image`, which Postiz leaves out.)

Every request is recorded with the key it carried, so tests can prove which key was used.
"""

import asyncio
import hashlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

PREFIX = "/public/v1"
HOUR = 3600.0
UPLOAD_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp", "video/mp4"}


@dataclass
class RecordedRequest:
    method: str
    path: str
    api_key: str | None


@dataclass
class Organization:
    api_key: str
    integrations: list[dict[str, Any]]
    posts_per_hour: int = 30
    posts: list[dict[str, Any]] = field(default_factory=list)
    media: list[dict[str, Any]] = field(default_factory=list)
    # sha256 and size of every uploaded file, by media id
    uploads: dict[str, tuple[str, int]] = field(default_factory=dict)
    post_times: list[float] = field(default_factory=list)
    # (method, path) → responses, each answered once instead of the real handler
    canned: dict[tuple[str, str], list[Callable[[], Response]]] = field(default_factory=dict)
    # While set, every request of the organization waits for it to be cleared.
    stalled: asyncio.Event | None = None
    # A slow Postiz: POST /posts stores its posts, then answers this much later.
    post_delay_seconds: float = 0.0
    post_delayed: asyncio.Event = field(default_factory=asyncio.Event)  # set once one is
    # POST /posts stores only this many of a request's posts, then answers 500, as Postiz
    # does when it fails half-way (it creates them one by one).
    store_posts_then_fail: int | None = None

    @property
    def live_posts(self) -> list[dict[str, Any]]:
        return [post for post in self.posts if not post["deletedAt"]]


def _validation_error(*messages: str) -> JSONResponse:
    return JSONResponse(
        {"statusCode": 400, "message": list(messages), "error": "Bad Request"}, status_code=400
    )


def _date(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class FakePostiz:
    def __init__(self) -> None:
        self.organizations: dict[str, Organization] = {}
        self.requests: list[RecordedRequest] = []
        self.files: dict[str, bytes] = {}
        # While set, POST /posts stores the post and then never answers.
        self.hang_after_accepting_posts = False
        self.hanging = asyncio.Event()  # set once a POST /posts is hanging
        self.stalled_requests = 0
        self._stalled_change = asyncio.Condition()
        self._release = asyncio.Event()
        self.base_url = ""
        # What /upload-from-url fetches with: one client, not a new one (and its TLS setup)
        # for each upload.
        self.fetcher = httpx.AsyncClient()
        self.app = Starlette(
            routes=[
                Route(f"{PREFIX}/is-connected", self._is_connected, methods=["GET"]),
                Route(f"{PREFIX}/integrations", self._integrations, methods=["GET"]),
                Route(f"{PREFIX}/upload", self._upload, methods=["POST"]),
                Route(f"{PREFIX}/upload-from-url", self._upload_from_url, methods=["POST"]),
                Route(f"{PREFIX}/posts", self._list_posts, methods=["GET"]),
                Route(f"{PREFIX}/posts", self._create_post, methods=["POST"]),
                Route(f"{PREFIX}/posts/{{post_id}}", self._delete_post, methods=["DELETE"]),
                Route("/files/{name}", self._file, methods=["GET"]),
            ]
        )

    # Test controls

    def add_organization(
        self, posts_per_hour: int = 30, integrations: int = 2, api_key: str = ""
    ) -> Organization:
        api_key = api_key or uuid.uuid4().hex + uuid.uuid4().hex
        organization = Organization(
            api_key=api_key,
            posts_per_hour=posts_per_hour,
            integrations=[
                {
                    "id": f"int-{uuid.uuid4().hex[:10]}",
                    "name": f"Channel {n}",
                    "identifier": "x" if n % 2 == 0 else "youtube",
                    "picture": f"https://pictures.example/{n}.png",
                    "disabled": False,
                    "profile": f"handle{n}",
                }
                for n in range(integrations)
            ],
        )
        self.organizations[api_key] = organization
        return organization

    def answer_once(
        self,
        organization: Organization,
        method: str,
        path: str,
        status: int,
        body: Any,
        headers: dict[str, str] | None = None,
    ) -> None:
        """The next `method path` of this organization gets this answer instead."""
        self.answer_once_with(
            organization,
            method,
            path,
            lambda: JSONResponse(body, status_code=status, headers=headers or {}),
        )

    def answer_once_with(
        self,
        organization: Organization,
        method: str,
        path: str,
        response: Callable[[], Response],
    ) -> None:
        """The next `method path` of this organization gets the response made then."""
        organization.canned.setdefault((method, path), []).append(response)

    def stall(self, organization: Organization) -> None:
        """Holds every request of the organization, unanswered, until `unstall`."""
        organization.stalled = asyncio.Event()

    def unstall(self, organization: Organization) -> None:
        if organization.stalled is not None:
            organization.stalled.set()
        organization.stalled = None

    async def stalled_requests_reach(self, count: int) -> None:
        """Returns once `count` requests are being held by `stall`."""
        async with self._stalled_change:
            await self._stalled_change.wait_for(lambda: self.stalled_requests >= count)

    def add_post(
        self, organization: Organization, integration_id: str, content: str, publish_date: datetime
    ) -> dict[str, Any]:
        """A post made outside the Publisher (in the Postiz app, by another tool)."""
        return _store_post(
            organization,
            integration_id,
            {"content": content},
            {},
            publish_date,
            "QUEUE",
            uuid.uuid4().hex,
        )

    def requests_of(self, method: str, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method and r.path == f"{PREFIX}{path}"]

    def release_hanging_posts(self) -> None:
        self.hang_after_accepting_posts = False
        self._release.set()
        self._release = asyncio.Event()
        self.hanging = asyncio.Event()

    # Plumbing

    async def _organization(self, request: Request) -> Organization | Response:
        api_key = request.headers.get("authorization")
        self.requests.append(RecordedRequest(request.method, request.url.path, api_key))
        if not api_key:
            return JSONResponse({"msg": "No API Key found"}, status_code=401)
        organization = self.organizations.get(api_key)
        if organization is None:
            return JSONResponse({"msg": "Invalid API key"}, status_code=401)
        if organization.stalled is not None:
            await self._hold(organization.stalled)
        canned = organization.canned.get((request.method, request.url.path.removeprefix(PREFIX)))
        if canned:
            return canned.pop(0)()
        return organization

    async def _hold(self, released: asyncio.Event) -> None:
        async with self._stalled_change:
            self.stalled_requests += 1
            self._stalled_change.notify_all()
        try:
            await released.wait()
        finally:
            self.stalled_requests -= 1

    # Endpoints

    async def _is_connected(self, request: Request) -> Response:
        organization = await self._organization(request)
        if isinstance(organization, Response):
            return organization
        return JSONResponse({"connected": True})

    async def _integrations(self, request: Request) -> Response:
        organization = await self._organization(request)
        if isinstance(organization, Response):
            return organization
        return JSONResponse(organization.integrations)

    def _save_media(self, organization: Organization, name: str, digest: str, size: int) -> dict:
        media_id = uuid.uuid4().hex
        media = {
            "id": media_id,
            "name": name,
            "path": f"{self.base_url}/uploads/{media_id}/{name}",
            "organizationId": organization.api_key[:8],
            "createdAt": _iso(datetime.now(UTC)),
        }
        organization.media.append(media)
        organization.uploads[media_id] = (digest, size)
        return media

    async def _upload(self, request: Request) -> Response:
        organization = await self._organization(request)
        if isinstance(organization, Response):
            return organization
        # Starlette spools file parts to disk beyond 1 MB, so a large upload stays out of RAM.
        async with request.form(max_part_size=1024 * 1024) as form:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                return JSONResponse({"msg": "No file provided"}, status_code=400)
            if upload.content_type not in UPLOAD_TYPES:
                return _validation_error("Unsupported file type.")
            digest = hashlib.sha256()
            size = 0
            while chunk := await upload.read(256 * 1024):
                digest.update(chunk)
                size += len(chunk)
            media = self._save_media(
                organization, upload.filename or "upload", digest.hexdigest(), size
            )
        return JSONResponse(media, status_code=201)

    async def _upload_from_url(self, request: Request) -> Response:
        organization = await self._organization(request)
        if isinstance(organization, Response):
            return organization
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("url"), str):
            return _validation_error("url must be a URL address")
        fetched = await self.fetcher.get(body["url"])
        if fetched.status_code != 200:
            return JSONResponse({"msg": "Failed to fetch URL"}, status_code=400)
        content = fetched.content
        media = self._save_media(
            organization, "upload.mp4", hashlib.sha256(content).hexdigest(), len(content)
        )
        return JSONResponse(media, status_code=201)

    async def _list_posts(self, request: Request) -> Response:
        organization = await self._organization(request)
        if isinstance(organization, Response):
            return organization
        start = _date(request.query_params.get("startDate"))
        end = _date(request.query_params.get("endDate"))
        if start is None or end is None:
            return _validation_error(
                "startDate must be a valid ISO 8601 date string",
                "endDate must be a valid ISO 8601 date string",
            )
        posts = [
            {key: value for key, value in post.items() if key != "deletedAt"}
            for post in organization.live_posts
            if start <= _date(post["publishDate"]) <= end
        ]
        return JSONResponse({"posts": posts})

    def _rate_headers(self, organization: Organization, now: float) -> dict[str, str]:
        organization.post_times = [t for t in organization.post_times if t > now - HOUR]
        used = len(organization.post_times)
        reset = organization.post_times[0] + HOUR - now if used else HOUR
        return {
            "X-RateLimit-Limit": str(organization.posts_per_hour),
            "X-RateLimit-Remaining": str(max(organization.posts_per_hour - used, 0)),
            "X-RateLimit-Reset": str(int(reset) + 1),
        }

    async def _create_post(self, request: Request) -> Response:
        organization = await self._organization(request)
        if isinstance(organization, Response):
            return organization
        now = time.time()
        headers = self._rate_headers(organization, now)
        if len(organization.post_times) >= organization.posts_per_hour:
            headers["Retry-After"] = headers["X-RateLimit-Reset"]
            return JSONResponse(
                {"statusCode": 429, "message": "ThrottlerException: Too Many Requests"},
                status_code=429,
                headers=headers,
            )
        organization.post_times.append(now)
        body = await request.json()
        problems = []
        if body.get("type") not in ("draft", "schedule", "now"):
            problems.append("type must be one of the following values: draft, schedule, now")
        if not isinstance(body.get("shortLink"), bool):
            problems.append("shortLink must be a boolean value")
        date = _date(body.get("date"))
        if date is None:
            problems.append("date must be a valid ISO 8601 date string")
        if not isinstance(body.get("tags"), list):
            problems.append("tags must be an array")
        posts = body.get("posts")
        if not isinstance(posts, list) or not posts:
            problems.append("posts must contain at least 1 elements")
            posts = []
        for post in posts:
            for value in post.get("value") or []:
                if len(value.get("content") or "") < 6:
                    problems.append("content must be longer than or equal to 6 characters")
        if problems:
            return _validation_error(*problems)
        known = {integration["id"] for integration in organization.integrations}
        for post in posts:
            if post["integration"]["id"] not in known:
                return JSONResponse({"msg": "Integration not found"}, status_code=400)
        if body["type"] == "now":  # Postiz dates it by its own clock, to the minute
            date = datetime.now(UTC).replace(second=0, microsecond=0)
        group = uuid.uuid4().hex
        created = []
        for post in posts:
            if len(created) == organization.store_posts_then_fail:
                return JSONResponse({"msg": "injected failure half-way"}, status_code=500)
            stored = _store_post(
                organization,
                post["integration"]["id"],
                post["value"][0],
                post.get("settings", {}),
                date,
                "DRAFT" if body["type"] == "draft" else "QUEUE",
                group,
            )
            created.append({"postId": stored["id"], "integration": post["integration"]["id"]})
        if self.hang_after_accepting_posts:
            self.hanging.set()
            await self._release.wait()
        if organization.post_delay_seconds:
            organization.post_delayed.set()
            await asyncio.sleep(organization.post_delay_seconds)
        headers = self._rate_headers(organization, now)
        return JSONResponse(created, status_code=201, headers=headers)

    async def _delete_post(self, request: Request) -> Response:
        organization = await self._organization(request)
        if isinstance(organization, Response):
            return organization
        post_id = request.path_params["post_id"]
        post = next((p for p in organization.live_posts if p["id"] == post_id), None)
        if post is None:
            return JSONResponse({"msg": "Post not found"}, status_code=404)
        for other in organization.live_posts:
            if other["group"] == post["group"]:
                other["deletedAt"] = _iso(datetime.now(UTC))
        # Postiz answers this even when the deletion worked.
        return JSONResponse({"error": True})

    async def _file(self, request: Request) -> Response:
        content = self.files.get(request.path_params["name"])
        if content is None:
            return Response(status_code=404)
        return Response(content, media_type="video/mp4")


def dribbling(interval_seconds: float) -> Response:
    """A 200 JSON answer that sends one byte every interval_seconds and never ends."""

    async def drops() -> AsyncIterator[bytes]:
        yield b"["
        while True:
            await asyncio.sleep(interval_seconds)
            yield b" "

    return StreamingResponse(drops(), media_type="application/json")


def streamed(content: bytes, media_type: str = "application/json") -> Response:
    """The content in chunks, without a Content-Length: its size shows only as it arrives."""

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(content), 64 * 1024):
            yield content[start : start + 64 * 1024]

    return StreamingResponse(chunks(), media_type=media_type)


def _store_post(
    organization: Organization,
    integration_id: str,
    value: dict[str, Any],
    settings: dict[str, Any],
    date: datetime,
    state: str,
    group: str,
) -> dict[str, Any]:
    """Stores one post as Postiz does, its content turned into HTML."""
    integration = next(i for i in organization.integrations if i["id"] == integration_id)
    post = {
        "id": uuid.uuid4().hex,
        "content": f"<p>{value['content']}</p>",
        "publishDate": _iso(date),
        "releaseURL": None,
        "state": state,
        "group": group,
        "image": value.get("image", []),
        "settings": settings,
        "integration": {
            "id": integration["id"],
            "providerIdentifier": integration["identifier"],
            "name": integration["name"],
            "picture": integration["picture"],
        },
        "deletedAt": None,
    }
    organization.posts.append(post)
    return post


@asynccontextmanager
async def serve_fake_postiz(port: int = 0) -> AsyncIterator[FakePostiz]:
    """The fake on a loopback port (0: an ephemeral one) until the block ends."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    fake = FakePostiz()
    sock.listen(128)  # connections queue here until uvicorn accepts them
    port = sock.getsockname()[1]
    fake.base_url = f"http://127.0.0.1:{port}"
    server = uvicorn.Server(
        uvicorn.Config(fake.app, lifespan="off", log_level="warning", timeout_graceful_shutdown=1)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield fake
    finally:
        fake.release_hanging_posts()
        for organization in fake.organizations.values():
            fake.unstall(organization)
        server.should_exit = True
        await task
        sock.close()
        await fake.fetcher.aclose()


def api_root(fake: FakePostiz) -> str:
    return fake.base_url + PREFIX
