"""Publications, media rules and the Postiz request body, independent of gRPC, SQL and HTTP."""

import enum
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from services.runtime.errors import InvalidArgument
from services.runtime.fields import shifted_time

MIB = 1024 * 1024

# What Postiz's /upload accepts, and the largest file of each kind.
MEDIA_SIZE_LIMITS: dict[str, int] = {
    "image/jpeg": 10 * MIB,
    "image/png": 10 * MIB,
    "image/gif": 10 * MIB,
    "image/webp": 10 * MIB,
    "video/mp4": 1024 * MIB,
}
MAX_CHUNK_BYTES = MIB

MISSING_CREDENTIALS = (
    "this profile has no Postiz credentials; call SetPostizCredentials with the Postiz public "
    "API base URL (for example https://api.postiz.com/public/v1) and the API key from Postiz "
    "Settings → Public API"
)


class PostType(enum.StrEnum):
    NOW = "now"
    SCHEDULE = "schedule"
    DRAFT = "draft"


class PublicationState(enum.StrEnum):
    PENDING = "PENDING"
    ACCEPTED = "ACCEPTED"
    FAILED = "FAILED"
    OUTCOME_UNKNOWN = "OUTCOME_UNKNOWN"


@dataclass(frozen=True, slots=True)
class PostizAccount:
    """Where and as whom to call Postiz for one profile. The key stays out of repr()."""

    profile_id: str
    base_url: str
    api_key: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class StoredCredentials:
    base_url: str
    api_key_ciphertext: bytes = field(repr=False)
    encryption_key_id: str
    api_key_fingerprint: str
    verify_time: datetime
    update_time: datetime


@dataclass(frozen=True, slots=True)
class Media:
    id: str
    name: str
    path: str


@dataclass(frozen=True, slots=True)
class MediaUpload:
    """What UploadMedia's first message promises about the file that follows."""

    filename: str
    content_type: str
    size_bytes: int

    def __post_init__(self) -> None:
        limit = MEDIA_SIZE_LIMITS.get(self.content_type)
        if limit is None:
            raise InvalidArgument(
                f"content_type {self.content_type[:64]!r} is not accepted by Postiz; use one of "
                f"{', '.join(MEDIA_SIZE_LIMITS)}"
            )
        if not 0 < self.size_bytes <= limit:
            raise InvalidArgument(
                f"size_bytes must be between 1 and {limit} for {self.content_type}, "
                f"got {self.size_bytes}"
            )
        if not self.filename or len(self.filename) > 255:
            raise InvalidArgument("filename is required, at most 255 characters")

    @property
    def safe_filename(self) -> str:
        """The name as it may appear in a multipart header."""
        return re.sub(r"[^A-Za-z0-9._ -]", "_", self.filename)


@dataclass(frozen=True, slots=True)
class CreatedPost:
    post_id: str
    integration_id: str


@dataclass(frozen=True, slots=True)
class PostizPost:
    id: str
    content: str
    publish_time: datetime
    release_url: str
    state: str
    group: str
    integration_id: str
    integration_name: str
    integration_identifier: str
    # The ids of its first value's media, when Postiz lists them (GET /posts does not).
    media_ids: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Integration:
    id: str
    name: str
    identifier: str
    picture: str
    disabled: bool
    profile: str
    customer_id: str
    customer_name: str


@dataclass(frozen=True, slots=True)
class PublicationDraft:
    """A publication as first recorded: the body for POST /posts and a digest of the request,
    so that reusing a request_id for a different post is refused."""

    request_id: str
    job_id: str
    publish_time: datetime
    postiz_request: dict[str, Any]
    request_digest: str


@dataclass(frozen=True, slots=True)
class Publication:
    request_id: str
    job_id: str
    state: PublicationState
    posts: tuple[CreatedPost, ...]
    error: str
    attempt_count: int
    publish_time: datetime
    create_time: datetime
    update_time: datetime
    postiz_request: dict[str, Any]
    request_digest: str

    def draft(self) -> PublicationDraft:
        return PublicationDraft(
            self.request_id,
            self.job_id,
            self.publish_time,
            self.postiz_request,
            self.request_digest,
        )


def request_digest(description: Any) -> str:
    canonical = json.dumps(description, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def postiz_post_body(
    post_type: PostType,
    publish_time: datetime,
    posts: list[dict[str, Any]],
    tags: list[dict[str, str]],
    short_link: bool,
) -> dict[str, Any]:
    """The JSON body of Postiz's POST /posts (CreatePostDto)."""
    return {
        "type": str(post_type),
        "date": publish_time.isoformat().replace("+00:00", "Z"),
        "shortLink": short_link,
        "tags": tags,
        "posts": posts,
    }


_TAG = re.compile(r"<[^>]+>")

# Postiz dates a "now" post by its own clock, to the minute: a clock this far behind ours
# still dates a post it made during the attempt no earlier than the attempt's minute.
POSTIZ_CLOCK_SKEW = timedelta(seconds=5)
# Postiz keeps a scheduled post's date to the millisecond; ours may carry microseconds.
SCHEDULE_TOLERANCE = timedelta(seconds=1)


def _comparable(content: str) -> str:
    return " ".join(_TAG.sub(" ", content).split())


def _minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def attempt_window(
    postiz_request: dict[str, Any], publish_time: datetime, attempt_start: datetime, now: datetime
) -> tuple[datetime, datetime]:
    """Where the posts an attempt made have their publishDate. GET /posts gives no creation
    time, so for a "now" post the date Postiz gave it (its clock, to the minute) stands in
    for it: from the attempt's start on. A scheduled post or draft has the date requested."""
    if postiz_request["type"] == PostType.NOW:
        return _minute(attempt_start - POSTIZ_CLOCK_SKEW), now + POSTIZ_CLOCK_SKEW
    return (
        shifted_time(publish_time, -SCHEDULE_TOLERANCE),
        shifted_time(publish_time, SCHEDULE_TOLERANCE),
    )


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """What Postiz holds of an attempt of unknown outcome, on the channels still wanted."""

    found: tuple[CreatedPost, ...]  # one post on each channel where exactly one matches
    missing: tuple[str, ...]  # channels where none matches: the attempt made no post there
    ambiguous: dict[str, tuple[str, ...]]  # channel → the post ids that match on it

    @property
    def ambiguity(self) -> str:
        return "; ".join(
            f"integration {integration}: posts {', '.join(ids)}"
            for integration, ids in self.ambiguous.items()
        )


def reconcile(
    postiz_request: dict[str, Any],
    recorded: tuple[CreatedPost, ...],
    listed: list[PostizPost],
    claimed: set[str],
    window: tuple[datetime, datetime],
) -> Reconciliation:
    """Matches the posts Postiz `listed` against the request's channels that have no
    `recorded` post yet. A post matches when no publication has `claimed` it, it is on that
    channel, has the same first content (Postiz may have turned it into HTML) and media
    (when Postiz lists them), and its date is in the attempt's `window`."""
    done = {post.integration_id for post in recorded}
    wanted = {
        post["integration"]["id"]: (
            _comparable(post["value"][0]["content"]),
            frozenset(image["id"] for image in post["value"][0].get("image", [])),
        )
        for post in postiz_request["posts"]
        if post["integration"]["id"] not in done
    }
    start, end = window
    candidates: dict[str, list[str]] = {integration: [] for integration in wanted}
    for post in listed:
        content, media = wanted.get(post.integration_id, (None, None))
        if (
            content is not None
            and post.id not in claimed
            and _comparable(post.content) == content
            and (post.media_ids is None or post.media_ids == media)
            and start <= post.publish_time <= end
        ):
            candidates[post.integration_id].append(post.id)
    return Reconciliation(
        found=tuple(CreatedPost(ids[0], i) for i, ids in candidates.items() if len(ids) == 1),
        missing=tuple(i for i, ids in candidates.items() if not ids),
        ambiguous={i: tuple(ids) for i, ids in candidates.items() if len(ids) > 1},
    )


def remaining_request(
    postiz_request: dict[str, Any], recorded: tuple[CreatedPost, ...]
) -> dict[str, Any]:
    """The POST /posts body for the request's channels that have no recorded post yet."""
    done = {post.integration_id for post in recorded}
    return postiz_request | {
        "posts": [p for p in postiz_request["posts"] if p["integration"]["id"] not in done]
    }


def in_request_order(postiz_request: dict[str, Any], posts: list[CreatedPost]) -> list[CreatedPost]:
    order = {p["integration"]["id"]: n for n, p in enumerate(postiz_request["posts"])}
    return sorted(posts, key=lambda post: order.get(post.integration_id, len(order)))


def new_draft(
    request_id: str,
    job_id: str,
    post_type: PostType,
    publish_time: datetime | None,
    posts: list[dict[str, Any]],
    tags: list[dict[str, str]],
    short_link: bool,
    described_as: Any,
) -> PublicationDraft:
    """A publication to record; `described_as` is what a retry must repeat exactly."""
    if post_type == PostType.SCHEDULE and publish_time is None:
        raise InvalidArgument("publish_time is required to schedule a post")
    if not posts:
        raise InvalidArgument("posts must name at least one integration")
    integrations = [post["integration"]["id"] for post in posts]
    if len(set(integrations)) != len(integrations):
        raise InvalidArgument(
            "posts names an integration more than once: give each channel one entry (a "
            "thread goes in its values)"
        )
    when = publish_time or datetime.now(UTC)
    return PublicationDraft(
        request_id=request_id,
        job_id=job_id,
        publish_time=when,
        postiz_request=postiz_post_body(post_type, when, posts, tags, short_link),
        request_digest=request_digest(described_as),
    )
