"""Publications, media rules and the Postiz request body, independent of gRPC, SQL and HTTP."""

import enum
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from services.runtime.errors import InvalidArgument

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


def _comparable(content: str) -> str:
    return " ".join(_TAG.sub(" ", content).split())


def matching_posts(
    postiz_request: dict[str, Any], found: list[PostizPost], claimed: set[str]
) -> list[CreatedPost]:
    """The posts in `found` that an earlier POST of `postiz_request` created: on each of its
    channels, the latest post with the same first content (Postiz may have turned it into
    HTML) that no other publication has `claimed`."""
    wanted = {
        post["integration"]["id"]: _comparable(post["value"][0]["content"])
        for post in postiz_request["posts"]
    }
    latest: dict[str, PostizPost] = {}
    for post in found:
        if post.id in claimed or wanted.get(post.integration_id) != _comparable(post.content):
            continue
        current = latest.get(post.integration_id)
        if current is None or post.publish_time >= current.publish_time:
            latest[post.integration_id] = post
    return [CreatedPost(post.id, post.integration_id) for post in latest.values()]


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
    when = publish_time or datetime.now(UTC)
    return PublicationDraft(
        request_id=request_id,
        job_id=job_id,
        publish_time=when,
        postiz_request=postiz_post_body(post_type, when, posts, tags, short_link),
        request_digest=request_digest(described_as),
    )
