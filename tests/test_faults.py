"""Faults under load, each bounded in time: what a caller was told succeeded is there
afterwards, and what failed failed with a status it can act on.

Every test records its figures; `make test` prints them under "fault figures" (or run
`.venv/bin/python -m pytest tests/test_faults.py`).
"""

import asyncio
import base64
import collections
import contextlib
import dataclasses
import json
import secrets
import uuid
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jobs.v1 import jobs_pb2, jobs_pb2_grpc
from publisher.v1 import publisher_pb2, publisher_pb2_grpc

from services.jobs.service import JOBS
from services.publisher.fake_postiz import FakePostiz, Organization, api_root, serve_fake_postiz
from services.publisher.service import publisher_definition
from tests.conftest import (
    TEST_TRUSTED_HOSTS,
    PostizProfile,
    as_profile,
    new_profile_id,
    publisher_config,
    running,
    server_process,
    settings_for,
)
from tests.publisher_requests import post_request

Code = grpc.StatusCode
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WORKERS = 8


@dataclass
class JobLoad:
    """Writers creating jobs until told to stop; what they were told, counted."""

    stub: jobs_pb2_grpc.JobServiceStub
    profile: tuple[tuple[str, str], ...]
    acknowledged: list[str] = field(default_factory=list)
    # request_ids of the calls that failed: executed or not, the database tells
    failed_request_ids: list[str] = field(default_factory=list)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    progress: asyncio.Condition = field(default_factory=asyncio.Condition)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def calls(self) -> int:
        return sum(self.statuses.values())

    async def _write(self) -> None:
        while not self.stop.is_set():
            request = jobs_pb2.CreateJobRequest(
                job=jobs_pb2.Job(kind="load"), request_id=str(uuid.uuid4())
            )
            try:
                job = await self.stub.CreateJob(request, metadata=self.profile, timeout=10)
            except grpc.aio.AioRpcError as error:
                self.statuses[error.code().name] += 1
                self.failed_request_ids.append(request.request_id)
                if error.code() not in (Code.UNAVAILABLE, Code.CANCELLED):
                    return  # the test fails on the status; no point hammering
                await asyncio.sleep(0.02)  # a client's backoff before it retries
            else:
                self.statuses["OK"] += 1
                self.acknowledged.append(job.job_id)
            async with self.progress:
                self.progress.notify_all()

    async def until(self, predicate) -> None:
        async with self.progress:
            await asyncio.wait_for(self.progress.wait_for(predicate), 30)

    @contextlib.asynccontextmanager
    async def running(self):
        workers = [asyncio.create_task(self._write()) for _ in range(WORKERS)]
        try:
            yield self
        finally:
            self.stop.set()
            await asyncio.gather(*workers)


async def _health_becomes(updates, status: int) -> None:
    while (await asyncio.wait_for(updates.read(), 20)).status != status:
        pass


async def _stored(database_url: str, column: str, values: list[str]) -> set[str]:
    """Which of the values (job_id or request_id) the jobs table holds."""
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            f"SELECT {column}::text AS v FROM jobs.jobs WHERE {column}::text = ANY($1::text[])",
            values,
        )
    finally:
        await connection.close()
    return {row["v"] for row in rows}


async def test_postgres_restart_under_load_loses_no_acknowledged_write(
    disposable_postgres, fault_figures
):
    settings = settings_for(disposable_postgres.url, health_check_interval_seconds=0.1)
    async with (
        running(JOBS, settings) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="jobs.v1.JobService")
        )
        await _health_becomes(health, SERVING)
        load = JobLoad(jobs_pb2_grpc.JobServiceStub(channel), as_profile(new_profile_id()))
        async with load.running():
            await load.until(lambda: len(load.acknowledged) >= 100)
            await asyncio.to_thread(disposable_postgres.stop)
            await _health_becomes(health, NOT_SERVING)
            await load.until(lambda: load.statuses["UNAVAILABLE"] >= 20)
            acknowledged_before_restart = len(load.acknowledged)
            await asyncio.to_thread(disposable_postgres.start)
            await _health_becomes(health, SERVING)
            await load.until(lambda: len(load.acknowledged) >= acknowledged_before_restart + 100)
        health.cancel()
        stored = await _stored(disposable_postgres.url, "job_id", load.acknowledged)
        failed_yet_stored = await _stored(
            disposable_postgres.url, "request_id", load.failed_request_ids
        )
    lost = set(load.acknowledged) - stored
    fault_figures["postgres restart under load"] = {
        "calls": load.calls,
        "faults": 1,
        "unavailable": load.statuses["UNAVAILABLE"],
        "acknowledged_writes": len(load.acknowledged),
        "writes_lost": len(lost),
        # committed as the connection broke: the caller retries with the same request_id
        "unavailable_yet_committed": len(failed_yet_stored),
    }
    assert set(load.statuses) <= {"OK", "UNAVAILABLE"}, load.statuses
    assert not lost


async def _lock_rows(database_url: str, job_ids: list[str]) -> asyncpg.Connection:
    """A connection holding the jobs' row locks, so UpdateJob calls on them wait in flight."""
    connection = await asyncpg.connect(database_url)
    await connection.execute("BEGIN")
    await connection.execute(
        "SELECT 1 FROM jobs.jobs WHERE job_id = ANY($1::uuid[]) FOR UPDATE", job_ids
    )
    return connection


async def _lock_waiters_reach(database_url: str, count: int) -> None:
    """Waits for `count` queries blocked on a lock in the database, polling Postgres (no event
    crosses the process boundary) from a connection of its own: a transaction sees one
    snapshot of pg_stat_activity."""
    connection = await asyncpg.connect(database_url)
    try:
        async with asyncio.timeout(20):
            for _ in range(1000):
                waiting = await connection.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
                if waiting >= count:
                    return
                await asyncio.sleep(0.02)
    finally:
        await connection.close()


def _progress(job_id: str, progress: int) -> jobs_pb2.UpdateJobRequest:
    return jobs_pb2.UpdateJobRequest(
        job=jobs_pb2.Job(job_id=job_id, progress=progress),
        update_mask=field_mask_pb2.FieldMask(paths=["progress"]),
    )


async def test_sigterm_under_load_fails_no_call_in_flight(database_url, fault_figures):
    async with (
        server_process("jobs", database_url, SHUTDOWN_GRACE_SECONDS="20") as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        load = JobLoad(stub, as_profile(new_profile_id()))
        blocked_jobs = [
            (
                await stub.CreateJob(
                    jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k")), metadata=load.profile
                )
            ).job_id
            for _ in range(4)
        ]
        health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        await _health_becomes(health, SERVING)
        lock = await _lock_rows(database_url, blocked_jobs)
        async with load.running():
            updates = [
                asyncio.ensure_future(stub.UpdateJob(_progress(j, 50), metadata=load.profile))
                for j in blocked_jobs
            ]
            await _lock_waiters_reach(database_url, len(blocked_jobs))
            await load.until(lambda: len(load.acknowledged) >= 100)
            server.process.terminate()
            await _health_becomes(health, NOT_SERVING)
            health.cancel()  # an open stream would hold the drain for the whole grace period
            await lock.execute("COMMIT")
            await lock.close()
            updated = await asyncio.wait_for(asyncio.gather(*updates), 20)
            await load.until(lambda: load.statuses["UNAVAILABLE"] > 0)
        exit_code = await asyncio.wait_for(server.process.wait(), 30)
    stored = await _stored(database_url, "job_id", load.acknowledged)
    failed_yet_stored = await _stored(database_url, "request_id", load.failed_request_ids)
    access = [line for line in server.output if "services.access" in line]
    failed_on_server = [line for line in access if " OK " not in line]
    fault_figures["SIGTERM under load"] = {
        "calls": load.calls + len(updates),
        "faults": 1,
        "calls_in_flight_at_sigterm": len(updates),
        "in_flight_failed": sum(1 for job in updated if job.progress != 50),
        "calls_accepted_then_failed": len(failed_on_server),
        "refused_at_shutdown": len(load.failed_request_ids),
        "refused_yet_executed": len(failed_yet_stored),
        "writes_lost": len(set(load.acknowledged) - stored),
    }
    assert exit_code == 0
    assert all(job.progress == 50 for job in updated)
    assert not failed_on_server, failed_on_server
    # A call arriving as the server stops is refused before any handler takes it: UNAVAILABLE,
    # or CANCELLED when gRPC had queued it. Either way it never ran.
    assert set(load.statuses) <= {"OK", "UNAVAILABLE", "CANCELLED"}, load.statuses
    assert not failed_yet_stored
    assert set(load.acknowledged) <= stored


def _inject(fake: FakePostiz, organization: Organization, fault: str) -> None:
    if fault == "slow":
        fake.hang_after_accepting_posts = True  # stores the post, then never answers
    elif fault == "429":
        fake.answer_once(
            organization, "POST", "/posts", 429, {"message": "Too Many"}, {"Retry-After": "0"}
        )
    else:
        fake.answer_once(organization, "POST", "/posts", int(fault), {"msg": "injected"})


# What the first call of each fault answers; a retry with the same request_id then posts once.
POSTIZ_FAULTS = {
    "500": Code.UNAVAILABLE,
    "502": Code.UNAVAILABLE,
    "503": Code.UNAVAILABLE,
    "504": Code.UNAVAILABLE,
    "429": Code.RESOURCE_EXHAUSTED,
    "slow": Code.UNAVAILABLE,
}


async def _connect(stub, fake: FakePostiz) -> PostizProfile:
    organization = fake.add_organization(posts_per_hour=1000)
    metadata = as_profile(new_profile_id())
    await stub.SetPostizCredentials(
        publisher_pb2.SetPostizCredentialsRequest(
            base_url=api_root(fake), api_key=organization.api_key
        ),
        metadata=metadata,
    )
    return PostizProfile(metadata, organization)


async def test_postiz_faults_fail_cleanly_and_never_duplicate_a_post(
    database_url, jobs_service, fault_figures
):
    config = dataclasses.replace(publisher_config(jobs_service), posts_per_hour=1000)
    calls = 0
    statuses: collections.Counter = collections.Counter()
    async with (
        serve_fake_postiz() as fake,
        running(publisher_definition(config), settings_for(database_url)) as publisher,
        grpc.aio.insecure_channel(f"127.0.0.1:{publisher.port}") as channel,
    ):
        stub = publisher_pb2_grpc.PublisherServiceStub(channel)
        profile = await _connect(stub, fake)
        drills = [(n, fault) for n in range(2) for fault in POSTIZ_FAULTS]
        for n, fault in drills:
            request = post_request(profile, content=f"Fault drill {n} {fault}")
            _inject(fake, profile.organization, fault)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.CreatePost(request, metadata=profile.metadata)
            calls += 1
            statuses[raised.value.code().name] += 1
            assert raised.value.code() == POSTIZ_FAULTS[fault], raised.value.details()
            fake.release_hanging_posts()
            retried = await stub.CreatePost(request, metadata=profile.metadata)
            again = await stub.CreatePost(request, metadata=profile.metadata)
            calls += 2
            assert retried.state == again.state == publisher_pb2.PUBLICATION_STATE_ACCEPTED
            assert [p.post_id for p in retried.posts] == [p.post_id for p in again.posts]
        contents = collections.Counter(p["content"] for p in profile.organization.live_posts)
        duplicated = sum(count - 1 for count in contents.values())
        async with serve_fake_postiz() as doomed:
            down = await _connect(stub, doomed)
        for call in (
            stub.CreatePost(post_request(down), metadata=down.metadata),
            stub.ListIntegrations(publisher_pb2.ListIntegrationsRequest(), metadata=down.metadata),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            calls += 1
            statuses[raised.value.code().name] += 1
            assert raised.value.code() == Code.UNAVAILABLE
    fault_figures["Postiz 5xx, 429, slow, down"] = {
        "calls": calls,
        "faults": len(drills) + 1,
        "posts_expected": len(drills),
        "posts_made": sum(contents.values()),
        "posts_duplicated": duplicated,
    }
    assert set(statuses) <= {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}
    assert sum(contents.values()) == len(drills)
    assert duplicated == 0
    assert not down.organization.posts


async def _settled(pool: asyncpg.Pool, database_url: str) -> None:
    """Waits until no query waits on a lock and every pool connection is idle again (polling:
    the server's handler ends on its own time after the client gave up)."""
    connection = await asyncpg.connect(database_url)
    try:
        async with asyncio.timeout(20):
            for _ in range(1000):
                waiting = await connection.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
                if not waiting and pool.get_idle_size() == pool.get_size():
                    return
                await asyncio.sleep(0.02)
    finally:
        await connection.close()


async def _sessions_idle_in_transaction(database_url: str) -> int:
    connection = await asyncpg.connect(database_url)
    try:
        return await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'jobs' AND state LIKE 'idle in transaction%'"
        )
    finally:
        await connection.close()


async def test_call_cancelled_or_past_its_deadline_mid_transaction_rolls_back(
    database_url, fault_figures
):
    settings = settings_for(database_url, db_pool_max_size=2, health_check_interval_seconds=60)
    interruptions = ["deadline", "cancel"] * 3  # more than the pool holds: a leak would show
    outcomes: collections.Counter = collections.Counter()
    async with (
        running(JOBS, settings) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        profile = as_profile(new_profile_id())
        job = await stub.CreateJob(
            jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k")), metadata=profile
        )
        for progress, interruption in enumerate(interruptions, start=1):
            lock = await _lock_rows(database_url, [job.job_id])
            call = stub.UpdateJob(
                _progress(job.job_id, progress),
                metadata=profile,
                timeout=0.5 if interruption == "deadline" else None,
            )
            if interruption == "cancel":
                await _lock_waiters_reach(database_url, 1)
                call.cancel()
            with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)) as raised:
                await call
            code = raised.value.code() if isinstance(raised.value, grpc.aio.AioRpcError) else None
            outcomes[(code or Code.CANCELLED).name] += 1
            await _settled(service.pool.pool, database_url)
            await lock.execute("COMMIT")
            await lock.close()
        after = await stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=profile)
        idle_in_transaction = await _sessions_idle_in_transaction(database_url)
        pool = service.pool.pool
        pool_state = (pool.get_size(), pool.get_idle_size())
        concurrent = await asyncio.gather(
            *(
                stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=profile)
                for _ in range(10)
            )
        )
        finished = await stub.UpdateJob(_progress(job.job_id, 99), metadata=profile)
    fault_figures["cancel and deadline mid-transaction"] = {
        "calls": len(interruptions) + len(concurrent) + 3,
        "faults": len(interruptions),
        "half_written": int(after.etag != job.etag or after.progress != 0),
        "connections_leaked": pool_state[0] - pool_state[1] + idle_in_transaction,
    }
    assert outcomes == {"DEADLINE_EXCEEDED": 3, "CANCELLED": 3}
    assert (after.progress, after.etag) == (0, job.etag)
    assert idle_in_transaction == 0
    assert pool_state[0] == pool_state[1]
    assert finished.progress == 99


SLOW_POST_SECONDS = 2.0  # longer than the Publisher takes to begin its shutdown


async def _publications(database_url: str, request_ids: list[str]) -> dict[str, dict]:
    """The stored publications of these request_ids: state and post ids, by request_id."""
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "SELECT request_id, state, posts::text FROM publisher.publications "
            "WHERE request_id = ANY($1::text[])",
            request_ids,
        )
    finally:
        await connection.close()
    return {
        row["request_id"]: {
            "state": row["state"],
            "post_ids": [post["post_id"] for post in json.loads(row["posts"])],
        }
        for row in rows
    }


async def _completed_job(stub: jobs_pb2_grpc.JobServiceStub, metadata, video_url: str) -> str:
    job = await stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="video_render")), metadata=metadata
    )
    change = jobs_pb2.Job(job_id=job.job_id, status=jobs_pb2.COMPLETED)
    change.result.update({"video_url": video_url})
    await stub.UpdateJob(
        jobs_pb2.UpdateJobRequest(
            job=change, update_mask=field_mask_pb2.FieldMask(paths=["status", "result"])
        ),
        metadata=metadata,
    )
    return job.job_id


async def test_sigterm_mid_post_lets_the_post_finish_and_be_recorded(
    database_url, jobs_service, jobs_stub, fault_figures
):
    key = secrets.token_bytes(32)
    env = {
        "PUBLISHER_ENCRYPTION_KEYS": "k1:" + base64.b64encode(key).decode(),
        "JOBS_TARGET": f"127.0.0.1:{jobs_service.port}",
        "POSTIZ_TRUSTED_HOSTS": ",".join(TEST_TRUSTED_HOSTS),
        "SHUTDOWN_GRACE_SECONDS": "20",
        "PUBLISHER_RECONCILE_GRACE_SECONDS": "0",
    }
    async with serve_fake_postiz() as fake:
        async with (
            server_process("publisher", database_url, **env) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            stub = publisher_pb2_grpc.PublisherServiceStub(channel)
            poster, job_owner = await _connect(stub, fake), await _connect(stub, fake)
            fake.files["render.mp4"] = b"\x00\x00\x00\x18ftypmp42" + bytes(1000)
            job_id = await _completed_job(
                jobs_stub, job_owner.metadata, f"{fake.base_url}/files/render.mp4"
            )
            create = post_request(poster, content="Posted across a SIGTERM")
            publish = publisher_pb2.PublishJobRequest(
                job_id=job_id,
                integration_ids=[i["id"] for i in job_owner.organization.integrations],
                content="Rendered across a SIGTERM",
            )
            for profile in (poster, job_owner):
                profile.organization.post_delay_seconds = SLOW_POST_SECONDS
            calls = [
                asyncio.ensure_future(stub.CreatePost(create, metadata=poster.metadata)),
                asyncio.ensure_future(stub.PublishJob(publish, metadata=job_owner.metadata)),
            ]
            await asyncio.wait_for(
                asyncio.gather(*(p.organization.post_delayed.wait() for p in (poster, job_owner))),
                20,
            )
            server.process.terminate()
            outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 30)
            exit_code = await asyncio.wait_for(server.process.wait(), 30)
        request_ids = [create.request_id, f"job:{job_id}"]
        stored = await _publications(database_url, request_ids)
        job = await jobs_stub.GetJob(
            jobs_pb2.GetJobRequest(job_id=job_id), metadata=job_owner.metadata
        )
        posted_before_restart = len(fake.requests_of("POST", "/posts"))
        config = dataclasses.replace(publisher_config(jobs_service), encryption_keys={"k1": key})
        async with (
            running(publisher_definition(config), settings_for(database_url)) as restarted,
            grpc.aio.insecure_channel(f"127.0.0.1:{restarted.port}") as channel,
        ):
            stub = publisher_pb2_grpc.PublisherServiceStub(channel)
            retried = [
                await stub.CreatePost(create, metadata=poster.metadata),
                await stub.PublishJob(publish, metadata=job_owner.metadata),
            ]
    made = [p["id"] for profile in (poster, job_owner) for p in profile.organization.live_posts]
    recorded = {post_id for publication in stored.values() for post_id in publication["post_ids"]}
    failed = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    written = job.result["publication"]["posts"] if "publication" in job.result else []
    fault_figures["Publisher SIGTERM mid-post"] = {
        "calls": len(calls) + len(retried),
        "faults": 1,
        "calls_in_flight_at_sigterm": len(calls),
        "in_flight_failed": len(failed),
        "posts_made": len(made),
        # one channel for CreatePost, two for PublishJob
        "posts_duplicated": max(len(made) - 3, 0),
        "posts_unrecorded": len(set(made) - recorded),
        "job_results_unwritten": int(len(written) != 2),
    }
    assert exit_code == 0
    assert not failed, failed
    assert len(made) == 3
    assert {p["state"] for p in stored.values()} == {"ACCEPTED"}
    assert set(made) == recorded
    assert sorted(p["post_id"] for p in written) == sorted(stored[request_ids[1]]["post_ids"])
    for before, after in zip(outcomes, retried, strict=True):
        assert [p.post_id for p in after.posts] == [p.post_id for p in before.posts]
    assert len(fake.requests_of("POST", "/posts")) == posted_before_restart == 2
