"""SQL for the publisher schema. Every method runs in one tenant-scoped transaction."""

import enum
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from services.publisher.api_key_cipher import Sealed
from services.publisher.metrics import RATE_LIMIT_REFUSALS
from services.publisher.model import (
    CreatedPost,
    Publication,
    PublicationDraft,
    PublicationState,
    StoredCredentials,
)
from services.runtime.database import TenantScopedPool
from services.runtime.errors import (
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)

_CREDENTIAL_COLUMNS = (
    "base_url, api_key_ciphertext, encryption_key_id, api_key_fingerprint, verify_time, update_time"
)
_PUBLICATION_COLUMNS = """
    p.request_id, p.job_id, p.state, p.posts, p.error, p.publish_time, p.create_time,
    p.update_time, p.postiz_request, p.request_digest,
    (SELECT count(*) FROM publisher.publication_attempts a
     WHERE a.profile_id = p.profile_id AND a.request_id = p.request_id) AS attempt_count
"""
_HOUR = timedelta(hours=1)


def _credentials(row: asyncpg.Record) -> StoredCredentials:
    return StoredCredentials(
        base_url=row["base_url"],
        api_key_ciphertext=row["api_key_ciphertext"],
        encryption_key_id=row["encryption_key_id"],
        api_key_fingerprint=row["api_key_fingerprint"],
        verify_time=row["verify_time"],
        update_time=row["update_time"],
    )


def _utc(value: datetime) -> datetime:
    """asyncpg writes the first and last instants a datetime can hold (a publish_time at
    either end of the Timestamp range) as -infinity and infinity, and reads those back as
    naive datetimes: the same instants, in UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _publication(row: asyncpg.Record) -> Publication:
    return Publication(
        request_id=row["request_id"],
        job_id=row["job_id"],
        state=PublicationState(row["state"]),
        posts=tuple(CreatedPost(p["post_id"], p["integration_id"]) for p in row["posts"]),
        error=row["error"],
        attempt_count=row["attempt_count"],
        publish_time=_utc(row["publish_time"]),
        create_time=row["create_time"],
        update_time=row["update_time"],
        postiz_request=row["postiz_request"],
        request_digest=row["request_digest"],
    )


class NextStep(enum.Enum):
    """What a CreatePost call must do after claiming its publication."""

    DONE = "done"  # Postiz accepted it before: answer with the stored result
    SEND = "send"  # an attempt is recorded: POST it
    RECONCILE = "reconcile"  # an earlier attempt's outcome is unknown: search Postiz first


@dataclass(frozen=True, slots=True)
class Claim:
    publication: Publication
    step: NextStep
    attempt: int  # the attempt to send, or the one whose outcome is unknown (or the last)
    attempt_start: datetime


@dataclass(frozen=True, slots=True)
class PostingPolicy:
    posts_per_hour: int
    # An attempt still SENDING after this long has lost its caller: its outcome is unknown.
    in_flight_seconds: float
    # An attempt of unknown outcome is searched for only after this long, so that Postiz has
    # finished any request still in flight.
    reconcile_grace_seconds: float


class PublisherStore:
    def __init__(self, pool: TenantScopedPool) -> None:
        self._pool = pool

    # Credentials

    async def set_credentials(
        self,
        profile_id: str,
        base_url: str,
        api_key_ciphertext: bytes,
        encryption_key_id: str,
        api_key_fingerprint: str,
        verify_time: datetime,
    ) -> StoredCredentials:
        async with self._pool.transaction(profile_id) as connection:
            row = await connection.fetchrow(
                f"""
                INSERT INTO publisher.postiz_credentials AS c (profile_id, base_url,
                    api_key_ciphertext, encryption_key_id, api_key_fingerprint, verify_time)
                VALUES ($1, $2, $3, $4, $5, $6)
                ON CONFLICT (profile_id) DO UPDATE SET
                    base_url = EXCLUDED.base_url,
                    api_key_ciphertext = EXCLUDED.api_key_ciphertext,
                    encryption_key_id = EXCLUDED.encryption_key_id,
                    api_key_fingerprint = EXCLUDED.api_key_fingerprint,
                    verify_time = EXCLUDED.verify_time,
                    rate_limited_until = CASE
                        WHEN c.api_key_fingerprint = EXCLUDED.api_key_fingerprint
                        THEN c.rate_limited_until END,
                    update_time = clock_timestamp()
                RETURNING {_CREDENTIAL_COLUMNS}
                """,
                profile_id,
                base_url,
                api_key_ciphertext,
                encryption_key_id,
                api_key_fingerprint,
                verify_time,
            )
        return _credentials(row)

    async def get_credentials(self, profile_id: str) -> StoredCredentials | None:
        async with self._pool.transaction(profile_id, readonly=True) as connection:
            row = await connection.fetchrow(
                f"SELECT {_CREDENTIAL_COLUMNS} FROM publisher.postiz_credentials "
                "WHERE profile_id = $1",
                profile_id,
            )
        return None if row is None else _credentials(row)

    async def credentials_of_every_profile(self) -> list[tuple[str, str, Sealed]]:
        """(profile id, base_url, sealed API key) of every profile: an operator's read."""
        async with self._pool.cross_profile_transaction() as connection:
            rows = await connection.fetch(
                "SELECT profile_id, base_url, encryption_key_id, api_key_ciphertext "
                "FROM publisher.postiz_credentials ORDER BY profile_id"
            )
        return [
            (
                r["profile_id"],
                r["base_url"],
                Sealed(r["encryption_key_id"], r["api_key_ciphertext"]),
            )
            for r in rows
        ]

    async def replace_sealed_api_key(self, profile_id: str, old: Sealed, new: Sealed) -> bool:
        """Puts `new` where `old` is (key rotation); False when the credentials changed
        meanwhile, which leaves them as they are."""
        async with self._pool.transaction(profile_id) as connection:
            replaced = await connection.fetchval(
                """
                UPDATE publisher.postiz_credentials
                SET api_key_ciphertext = $4, encryption_key_id = $5
                WHERE profile_id = $1 AND encryption_key_id = $2 AND api_key_ciphertext = $3
                RETURNING profile_id
                """,
                profile_id,
                old.key_id,
                old.blob,
                new.blob,
                new.key_id,
            )
        return replaced is not None

    async def delete_credentials(self, profile_id: str) -> None:
        async with self._pool.transaction(profile_id) as connection:
            deleted = await connection.fetchval(
                "DELETE FROM publisher.postiz_credentials WHERE profile_id = $1 "
                "RETURNING profile_id",
                profile_id,
            )
        if deleted is None:
            raise NotFound("this profile has no Postiz credentials")

    # Publications

    async def publications_page(
        self, profile_id: str, after_request_id: str, limit: int
    ) -> list[Publication]:
        """Up to `limit` of the profile's publications, in request_id order after the one
        given."""
        async with self._pool.transaction(profile_id, readonly=True) as connection:
            rows = await connection.fetch(
                f"SELECT {_PUBLICATION_COLUMNS} FROM publisher.publications p "
                "WHERE p.profile_id = $1 AND p.request_id > $2 ORDER BY p.request_id LIMIT $3",
                profile_id,
                after_request_id,
                limit,
            )
        return [_publication(row) for row in rows]

    async def count_for_deletion(self, profile_id: str) -> tuple[int, int]:
        """(credentials: 0 or 1, publications) the profile holds."""
        async with self._pool.transaction(profile_id, readonly=True) as connection:
            row = await connection.fetchrow(
                "SELECT (SELECT count(*) FROM publisher.postiz_credentials WHERE profile_id = $1)"
                " AS credentials, "
                "(SELECT count(*) FROM publisher.publications WHERE profile_id = $1)"
                " AS publications",
                profile_id,
            )
        return row["credentials"], row["publications"]

    async def delete_publications(self, profile_id: str, limit: int) -> int:
        """Deletes up to `limit` of the profile's publications with their attempts: how many."""
        async with self._pool.transaction(profile_id) as connection:
            return await connection.fetchval(
                """
                WITH deleted AS (
                    DELETE FROM publisher.publications WHERE profile_id = $1 AND request_id IN (
                        SELECT request_id FROM publisher.publications WHERE profile_id = $1
                        LIMIT $2
                    )
                    RETURNING 1
                )
                SELECT count(*) FROM deleted
                """,
                profile_id,
                limit,
            )

    async def get_publication(self, profile_id: str, request_id: str) -> Publication | None:
        async with self._pool.transaction(profile_id, readonly=True) as connection:
            row = await connection.fetchrow(
                f"SELECT {_PUBLICATION_COLUMNS} FROM publisher.publications p "
                "WHERE p.profile_id = $1 AND p.request_id = $2",
                profile_id,
                request_id,
            )
        return None if row is None else _publication(row)

    async def find_publication_of_post(self, profile_id: str, post_id: str) -> Publication | None:
        async with self._pool.transaction(profile_id, readonly=True) as connection:
            row = await connection.fetchrow(
                f"""
                SELECT {_PUBLICATION_COLUMNS} FROM publisher.publications p
                WHERE p.profile_id = $1 AND p.posts @> $2
                ORDER BY p.create_time DESC LIMIT 1
                """,
                profile_id,
                [{"post_id": post_id}],
            )
        return None if row is None else _publication(row)

    async def claimed_post_ids(self, profile_id: str, post_ids: list[str]) -> set[str]:
        """Those of `post_ids` that a publication of this profile already holds."""
        async with self._pool.transaction(profile_id, readonly=True) as connection:
            rows = await connection.fetch(
                """
                SELECT DISTINCT post ->> 'post_id' AS post_id
                FROM publisher.publications p, jsonb_array_elements(p.posts) AS post
                WHERE p.profile_id = $1 AND post ->> 'post_id' = ANY($2::text[])
                """,
                profile_id,
                post_ids,
            )
        return {row["post_id"] for row in rows}

    async def claim(self, profile_id: str, draft: PublicationDraft, policy: PostingPolicy) -> Claim:
        """Records the publication (first call) and decides the next step.

        Holds the profile's credentials row for the transaction, so that the budget check
        and the new attempt are one step for each profile. A SEND claim has its attempt
        committed before Postiz is called.
        """
        async with self._pool.transaction(profile_id) as connection:
            credentials = await connection.fetchrow(
                """
                SELECT rate_limited_until, clock_timestamp() AS now
                FROM publisher.postiz_credentials WHERE profile_id = $1 FOR UPDATE
                """,
                profile_id,
            )
            if credentials is None:
                raise FailedPrecondition("this profile's Postiz credentials were removed")
            now: datetime = credentials["now"]
            await connection.execute(
                """
                INSERT INTO publisher.publications (profile_id, request_id, job_id,
                    postiz_request, request_digest, publish_time)
                VALUES ($1, $2, $3, $4, $5, $6)
                ON CONFLICT (profile_id, request_id) DO NOTHING
                """,
                profile_id,
                draft.request_id,
                draft.job_id,
                draft.postiz_request,
                draft.request_digest,
                draft.publish_time,
            )
            publication = _publication(
                await connection.fetchrow(
                    f"SELECT {_PUBLICATION_COLUMNS} FROM publisher.publications p "
                    "WHERE p.profile_id = $1 AND p.request_id = $2 FOR UPDATE",
                    profile_id,
                    draft.request_id,
                )
            )
            if publication.request_digest != draft.request_digest:
                raise InvalidArgument(
                    f"request_id {draft.request_id!r} was already used for a different post; "
                    "use a new request_id for a new post"
                )
            last = await connection.fetchrow(
                """
                SELECT attempt, outcome, start_time, end_time FROM publisher.publication_attempts
                WHERE profile_id = $1 AND request_id = $2 ORDER BY attempt DESC LIMIT 1
                """,
                profile_id,
                draft.request_id,
            )
            if publication.state == PublicationState.ACCEPTED:
                return Claim(publication, NextStep.DONE, last["attempt"], last["start_time"])
            if last is not None and last["outcome"] in ("SENDING", "OUTCOME_UNKNOWN"):
                in_flight_until = last["start_time"] + timedelta(seconds=policy.in_flight_seconds)
                settled_since = last["end_time"] or in_flight_until
                reconcile_from = settled_since + timedelta(seconds=policy.reconcile_grace_seconds)
                if now < reconcile_from:
                    wait = (reconcile_from - now).total_seconds()
                    raise Conflict(
                        f"an earlier attempt of request_id {draft.request_id!r} is in flight or "
                        f"its outcome is not known yet; retry with the same request_id in "
                        f"{wait:.0f}s"
                    )
                return Claim(publication, NextStep.RECONCILE, last["attempt"], last["start_time"])
            await self._check_budget(
                connection, profile_id, credentials["rate_limited_until"], now, policy
            )
            attempt = 1 if last is None else last["attempt"] + 1
            start_time = await connection.fetchval(
                """
                INSERT INTO publisher.publication_attempts (profile_id, request_id, attempt)
                VALUES ($1, $2, $3) RETURNING start_time
                """,
                profile_id,
                draft.request_id,
                attempt,
            )
            row = await connection.fetchrow(
                f"""
                UPDATE publisher.publications p SET state = 'PENDING', error = '',
                    update_time = clock_timestamp()
                WHERE p.profile_id = $1 AND p.request_id = $2
                RETURNING {_PUBLICATION_COLUMNS}
                """,
                profile_id,
                draft.request_id,
            )
        return Claim(_publication(row), NextStep.SEND, attempt, start_time)

    @staticmethod
    async def _check_budget(
        connection: asyncpg.Connection,
        profile_id: str,
        rate_limited_until: datetime | None,
        now: datetime,
        policy: PostingPolicy,
    ) -> None:
        if rate_limited_until is not None and rate_limited_until > now:
            wait = (rate_limited_until - now).total_seconds()
            RATE_LIMIT_REFUSALS.labels("postiz_wait").inc()
            raise ResourceExhausted(
                f"Postiz asked this profile to wait before posting again; retry in {wait:.0f}s",
                wait,
            )
        used, oldest = await connection.fetchrow(
            """
            SELECT count(*), min(start_time) FROM publisher.publication_attempts
            WHERE profile_id = $1 AND start_time > $2
            """,
            profile_id,
            now - _HOUR,
        )
        if used >= policy.posts_per_hour:
            wait = (oldest + _HOUR - now).total_seconds()
            RATE_LIMIT_REFUSALS.labels("posts_per_hour").inc()
            raise ResourceExhausted(
                f"this profile's Postiz budget of {policy.posts_per_hour} posts an hour is "
                f"spent; retry in {wait:.0f}s",
                wait,
            )

    async def finish_attempt(
        self,
        profile_id: str,
        request_id: str,
        attempt: int,
        state: PublicationState,
        posts: list[CreatedPost] | None = None,
        error: str = "",
        rate_limited_until: datetime | None = None,
    ) -> Publication | None:
        """Records an attempt's outcome (or a reconciliation's finding) on the attempt and the
        publication; `posts`, when given, replace the publication's, which are kept otherwise.
        Returns None when a later attempt has taken over since."""
        async with self._pool.transaction(profile_id) as connection:
            updated = await connection.fetchval(
                """
                UPDATE publisher.publication_attempts
                SET outcome = $4, error = $5, end_time = clock_timestamp()
                WHERE profile_id = $1 AND request_id = $2 AND attempt = $3
                  AND attempt = (SELECT max(attempt) FROM publisher.publication_attempts
                                 WHERE profile_id = $1 AND request_id = $2)
                RETURNING attempt
                """,
                profile_id,
                request_id,
                attempt,
                str(state),
                error,
            )
            if updated is None:
                return None
            if rate_limited_until is not None:
                await connection.execute(
                    """
                    UPDATE publisher.postiz_credentials
                    SET rate_limited_until = greatest(rate_limited_until, $2)
                    WHERE profile_id = $1
                    """,
                    profile_id,
                    rate_limited_until,
                )
            row = await connection.fetchrow(
                f"""
                UPDATE publisher.publications p
                SET state = $3, posts = coalesce($4, p.posts), error = $5,
                    update_time = clock_timestamp()
                WHERE p.profile_id = $1 AND p.request_id = $2
                RETURNING {_PUBLICATION_COLUMNS}
                """,
                profile_id,
                request_id,
                str(state),
                None if posts is None else _posts_json(posts),
                error,
            )
        return _publication(row)


def _posts_json(posts: list[CreatedPost]) -> list[dict[str, Any]]:
    return [{"post_id": p.post_id, "integration_id": p.integration_id} for p in posts]
