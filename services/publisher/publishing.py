"""What the Publisher does, over its store, Postiz and the Jobs service; no gRPC, no SQL."""

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from services.publisher.api_key_cipher import ApiKeyCipher, Sealed, api_key_fingerprint
from services.publisher.egress import EgressPolicy
from services.publisher.jobs_client import JobsClient
from services.publisher.metrics import RATE_LIMIT_REFUSALS
from services.publisher.model import (
    MISSING_CREDENTIALS,
    CreatedPost,
    Integration,
    Media,
    MediaUpload,
    PostizAccount,
    PostizPost,
    PostType,
    Publication,
    PublicationDraft,
    PublicationState,
    StoredCredentials,
    attempt_window,
    in_request_order,
    new_draft,
    reconcile,
    remaining_request,
    request_digest,
)
from services.publisher.postiz import PostizClient, PostizRateLimited, PostOutcomeUnknown
from services.publisher.store import NextStep, PostingPolicy, PublisherStore
from services.runtime.errors import (
    Conflict,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from services.runtime.fields import shifted_time
from services.runtime.lifecycle import delete_in_batches

log = logging.getLogger(__name__)

GET_POST_WINDOW = timedelta(days=1)
_CLAIM_ROUNDS = 3


class Publisher:
    def __init__(
        self,
        store: PublisherStore,
        postiz: PostizClient,
        cipher: ApiKeyCipher,
        jobs: JobsClient,
        policy: PostingPolicy,
        egress: EgressPolicy,
    ) -> None:
        self._store = store
        self._postiz = postiz
        self._cipher = cipher
        self._jobs = jobs
        self._policy = policy
        self._egress = egress

    # Credentials

    async def set_credentials(
        self, profile_id: str, base_url: str, api_key: str
    ) -> StoredCredentials:
        """Stores the key once Postiz has accepted it."""
        api_key = api_key.strip()
        if not api_key:
            raise InvalidArgument("api_key is required: Postiz → Settings → Public API")
        account = PostizAccount(profile_id, self._egress.postiz_base_url(base_url), api_key)
        await self._postiz.check_connected(account)
        sealed = self._cipher.encrypt(profile_id, account.base_url, api_key)
        stored = await self._store.set_credentials(
            profile_id,
            account.base_url,
            sealed.blob,
            sealed.key_id,
            api_key_fingerprint(api_key),
            datetime.now(UTC),
        )
        log.info("Postiz credentials set (%s)", stored.api_key_fingerprint)
        return stored

    async def get_credentials(self, profile_id: str) -> StoredCredentials:
        stored = await self._store.get_credentials(profile_id)
        if stored is None:
            raise NotFound(MISSING_CREDENTIALS)
        return stored

    async def delete_credentials(self, profile_id: str) -> None:
        await self._store.delete_credentials(profile_id)
        log.info("Postiz credentials deleted")

    # A profile's lifecycle (operators)

    async def export_pages(
        self, profile_id: str, page_rows: int
    ) -> AsyncIterator[tuple[StoredCredentials | None, list[Publication]]]:
        """The credentials (in the first page only) and every publication, a page at a time."""
        credentials = await self._store.get_credentials(profile_id)
        after = ""
        while True:
            page = await self._store.publications_page(profile_id, after, page_rows + 1)
            yield credentials, page[:page_rows]
            if len(page) <= page_rows:
                return
            credentials, after = None, page[page_rows - 1].request_id

    async def count_for_deletion(self, profile_id: str) -> tuple[int, int]:
        """(credentials: 0 or 1, publications) the profile holds."""
        return await self._store.count_for_deletion(profile_id)

    async def delete_profile(self, profile_id: str) -> tuple[int, int, bool]:
        """Deletes the credentials first (so that nothing more is published), then the
        publications in batches: (credentials, publications deleted, whether none is left)."""
        try:
            await self._store.delete_credentials(profile_id)
            credentials = 1
        except NotFound:
            credentials = 0
        publications, done = await delete_in_batches(
            lambda limit: self._store.delete_publications(profile_id, limit)
        )
        return credentials, publications, done

    async def _account(self, profile_id: str) -> PostizAccount:
        """The profile's Postiz account; FailedPrecondition when it has none."""
        stored = await self._store.get_credentials(profile_id)
        if stored is None:
            raise FailedPrecondition(MISSING_CREDENTIALS)
        try:
            self._egress.postiz_base_url(stored.base_url)
        except InvalidArgument as error:
            # Set before the rules tightened (allow-list, https, public addresses).
            raise FailedPrecondition(
                f"this profile's Postiz base_url is no longer accepted: {error}; set it again "
                "with SetPostizCredentials"
            ) from None
        # Never rewritten here: an instance that does not hold the current key yet (a rolling
        # deploy) must still read every row; `suitectl postiz reencrypt` moves them.
        sealed = Sealed(stored.encryption_key_id, stored.api_key_ciphertext)
        api_key = self._cipher.decrypt(profile_id, stored.base_url, sealed)
        return PostizAccount(profile_id, stored.base_url, api_key)

    # Reads and media

    async def list_integrations(self, profile_id: str) -> list[Integration]:
        return await self._postiz.list_integrations(await self._account(profile_id))

    async def upload(
        self, profile_id: str, upload: MediaUpload, chunks: AsyncIterator[bytes]
    ) -> Media:
        return await self._postiz.upload(await self._account(profile_id), upload, chunks)

    async def upload_from_url(self, profile_id: str, url: str, field: str = "url") -> Media:
        """Has Postiz fetch the file at url, which must be as public as Postiz itself."""
        url = await self._egress.public_url(url, field)
        return await self._postiz.upload_from_url(await self._account(profile_id), url)

    async def list_posts(self, profile_id: str, start: datetime, end: datetime) -> list[PostizPost]:
        if start >= end:
            raise InvalidArgument("start_time must be before end_time")
        return await self._postiz.list_posts(await self._account(profile_id), start, end)

    async def page_of_posts(
        self,
        profile_id: str,
        start: datetime,
        end: datetime,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> tuple[list[PostizPost], bool]:
        """Up to `limit` posts of the window, newest publish time first (then id), strictly
        after the (publish_time, id) given, and whether more follow. Postiz answers a window
        in one reply, in no promised order; the order here makes page tokens stable."""
        posts = sorted(
            await self.list_posts(profile_id, start, end),
            key=lambda post: (post.publish_time, post.id),
            reverse=True,
        )
        if after is not None:
            posts = [post for post in posts if (post.publish_time, post.id) < after]
        return posts[:limit], len(posts) > limit

    async def get_post(
        self, profile_id: str, post_id: str, start: datetime | None, end: datetime | None
    ) -> PostizPost:
        """Postiz has no read of one post: search the window it must be in."""
        if start is None or end is None:
            publication = await self._store.find_publication_of_post(profile_id, post_id)
            if publication is None:
                raise InvalidArgument(
                    f"post {post_id} was not created through this service: give start_time and "
                    "end_time around its publish time"
                )
            start = shifted_time(publication.publish_time, -GET_POST_WINDOW)
            end = shifted_time(publication.publish_time, GET_POST_WINDOW)
        for post in await self.list_posts(profile_id, start, end):
            if post.id == post_id:
                return post
        raise NotFound(f"post {post_id} not found in this profile's Postiz organization")

    async def delete_post(self, profile_id: str, post_id: str) -> None:
        await self._postiz.delete_post(await self._account(profile_id), post_id)
        log.info("Postiz post %s deleted", post_id)

    # Publishing, exactly once

    async def create_post(self, profile_id: str, draft: PublicationDraft) -> Publication:
        """Posts the draft at most once per request_id.

        The attempt is committed before Postiz is called. A retry finds the stored result; a
        retry after an attempt of unknown outcome searches Postiz for what it made, and sends
        again only to the channels where it made nothing.
        """
        account = await self._account(profile_id)
        for _ in range(_CLAIM_ROUNDS):
            claim = await self._store.claim(profile_id, draft, self._policy)
            if claim.step == NextStep.DONE:
                return claim.publication
            if claim.step == NextStep.SEND:
                return await self._send(account, claim.publication, claim.attempt)
            publication = await self._reconcile(
                account, claim.publication, claim.attempt, claim.attempt_start
            )
            if publication is not None and publication.state == PublicationState.ACCEPTED:
                return publication
        raise Conflict(
            f"request_id {draft.request_id!r} is being published by another call; retry shortly"
        )

    async def _send(
        self, account: PostizAccount, publication: Publication, attempt: int
    ) -> Publication:
        request_id = publication.request_id
        profile_id = account.profile_id
        body = remaining_request(publication.postiz_request, publication.posts)
        try:
            posts, rate_limited_until = await self._postiz.create_post(account, body)
        except PostOutcomeUnknown as error:
            log.warning("publication %s attempt %d: outcome unknown", request_id, attempt)
            await self._store.finish_attempt(
                profile_id, request_id, attempt, PublicationState.OUTCOME_UNKNOWN, error=str(error)
            )
            raise
        except PostizRateLimited as error:
            RATE_LIMIT_REFUSALS.labels("postiz_429").inc()
            await self._store.finish_attempt(
                profile_id,
                request_id,
                attempt,
                PublicationState.FAILED,
                error=str(error),
                rate_limited_until=error.until,
            )
            raise
        except DomainError as error:
            await self._store.finish_attempt(
                profile_id, request_id, attempt, PublicationState.FAILED, error=str(error)
            )
            raise
        log.info("publication %s accepted by Postiz: %d post(s)", request_id, len(posts))
        finished = await self._store.finish_attempt(
            profile_id,
            request_id,
            attempt,
            PublicationState.ACCEPTED,
            posts=in_request_order(publication.postiz_request, [*publication.posts, *posts]),
            rate_limited_until=rate_limited_until,
        )
        return finished or await self._stored(profile_id, request_id)

    async def _reconcile(
        self,
        account: PostizAccount,
        publication: Publication,
        attempt: int,
        attempt_start: datetime,
    ) -> Publication | None:
        """Looks in Postiz for what the attempt of unknown outcome made, and adopts a post on
        a channel only when it is the one post there that matches and is no older than the
        attempt. All found: ACCEPTED. Some or none: the found ones are recorded and the next
        attempt posts on the other channels only. More than one candidate on a channel:
        FailedPrecondition, the attempt stays of unknown outcome, nothing is guessed."""
        request_id = publication.request_id
        profile_id = account.profile_id
        window = attempt_window(
            publication.postiz_request, publication.publish_time, attempt_start, datetime.now(UTC)
        )
        listed = await self._postiz.list_posts(account, *window)
        claimed = await self._store.claimed_post_ids(profile_id, [post.id for post in listed])
        finding = reconcile(publication.postiz_request, publication.posts, listed, claimed, window)
        log.info(
            "publication %s attempt %d reconciled: %d found, %d missing, %d ambiguous",
            request_id,
            attempt,
            len(finding.found),
            len(finding.missing),
            len(finding.ambiguous),
        )
        if finding.ambiguous:
            raise FailedPrecondition(
                f"request_id {request_id!r}: an earlier attempt's outcome is unknown and Postiz "
                f"holds more than one post it may have made ({finding.ambiguity}); delete the "
                "extra ones (DeletePost) and retry with the same request_id, which adopts a "
                "single post left, or posts again where none is left"
            )
        posts = in_request_order(publication.postiz_request, [*publication.posts, *finding.found])
        if not finding.missing:
            return await self._store.finish_attempt(
                profile_id, request_id, attempt, PublicationState.ACCEPTED, posts=posts
            )
        return await self._store.finish_attempt(
            profile_id,
            request_id,
            attempt,
            PublicationState.FAILED,
            posts=posts,
            error=(
                "after an attempt of unknown outcome Postiz had no post on integration(s) "
                f"{', '.join(finding.missing)}; a retry with the same request_id posts on "
                "those only"
            ),
        )

    async def _stored(self, profile_id: str, request_id: str) -> Publication:
        publication = await self._store.get_publication(profile_id, request_id)
        if publication is None:
            raise NotFound(f"publication {request_id!r} not found")
        return publication

    # Jobs

    async def publish_job(
        self,
        profile_id: str,
        job_id: str,
        integration_ids: list[str],
        content: str,
        publish_time: datetime | None,
        settings: dict[str, dict[str, Any]],
    ) -> Publication:
        """Uploads a COMPLETED job's video, posts it once per job, and writes the post ids
        into the job's result under "publication"."""
        if not integration_ids:
            raise InvalidArgument("integration_ids must name at least one integration")
        job = await self._jobs.get_job(job_id)
        if job.status != "COMPLETED":
            raise FailedPrecondition(
                f"job {job_id} is {job.status}; only a COMPLETED job can be published"
            )
        video_url = job.result.get("video_url")
        if not isinstance(video_url, str) or not video_url:
            raise FailedPrecondition(
                f"job {job_id} has no video to publish: its result must name it in video_url"
            )
        request_id = f"job:{job_id}"
        described_as = [job_id, integration_ids, content, publish_time, settings]
        existing = await self._store.get_publication(profile_id, request_id)
        if existing is None:
            media = await self.upload_from_url(
                profile_id, video_url, f"job {job_id}'s result.video_url"
            )
            draft = new_draft(
                request_id=request_id,
                job_id=job_id,
                post_type=PostType.NOW if publish_time is None else PostType.SCHEDULE,
                publish_time=publish_time,
                posts=[
                    {
                        "integration": {"id": integration_id},
                        "value": [
                            {"content": content, "image": [{"id": media.id, "path": media.path}]}
                        ],
                        "settings": settings.get(integration_id, {}),
                    }
                    for integration_id in integration_ids
                ],
                tags=[],
                short_link=False,
                described_as=described_as,
            )
        else:
            draft = existing.draft()
            if request_digest(described_as) != draft.request_digest:
                raise InvalidArgument(
                    f"job {job_id} was already published with other integrations, content, "
                    "time or settings"
                )
        publication = await self.create_post(profile_id, draft)
        await self._write_back(job_id, publication)
        return publication

    async def _write_back(self, job_id: str, publication: Publication) -> None:
        """Adds the post ids to the job's result, re-reading it when it changed meanwhile."""
        for _ in range(_CLAIM_ROUNDS):
            job = await self._jobs.get_job(job_id)
            result = job.result | {
                "publication": {
                    "request_id": publication.request_id,
                    "posts": [_post_json(post) for post in publication.posts],
                }
            }
            try:
                await self._jobs.write_result(job_id, result, job.etag)
            except Conflict:
                continue
            return
        raise Conflict(f"job {job_id} kept changing; PublishJob can be retried safely")


def _post_json(post: CreatedPost) -> dict[str, str]:
    return {"post_id": post.post_id, "integration_id": post.integration_id}
