"""LeaseJobs: the workers' queue. Leases are exclusive, end by completion, cancellation or
expiry (then a retry after a backoff, or FAILED past max_attempts), only their holder may
update a leased job, and profiles take turns.

Every test leases jobs of a kind of its own: leasing reads every profile's jobs.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from services.jobs.leasing import LeasePolicy
from services.jobs.service import jobs_definition
from tests.conftest import (
    as_profile,
    bearer,
    new_profile_id,
    running,
    settings_for,
    signed_in,
    token_for,
)

Code = grpc.StatusCode
LEASE_SECONDS = 1  # the shortest lease: expiry tests wait for it
# Expired leases are found quickly, and retried after a short backoff.
POLICY = LeasePolicy(sweep_seconds=0.05, retry_base_seconds=0.2, max_processing_per_profile=0)


@pytest.fixture(scope="module")
async def stub(database_url: str) -> AsyncIterator[jobs_pb2_grpc.JobServiceStub]:
    async with (
        running(jobs_definition(lease_policy=POLICY), settings_for(database_url)) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        yield jobs_pb2_grpc.JobServiceStub(channel)


@pytest.fixture
def kind() -> str:
    return f"lease-{uuid.uuid4().hex[:12]}"


async def create(
    stub: jobs_pb2_grpc.JobServiceStub, profile_id: str, kind: str, **fields: object
) -> jobs_pb2.Job:
    return await stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind=kind, **fields)),
        metadata=as_profile(profile_id),
    )


async def lease(
    stub: jobs_pb2_grpc.JobServiceStub,
    *kinds: str,
    max_jobs: int = 1,
    seconds: float = 60,
    wait: float = 0,
    worker: str = "worker-1",
    metadata: tuple = (),
) -> list[jobs_pb2.Job]:
    request = jobs_pb2.LeaseJobsRequest(kinds=kinds, max_jobs=max_jobs, worker=worker)
    request.lease_duration.FromTimedelta(timedelta(seconds=seconds))
    request.wait.FromTimedelta(timedelta(seconds=wait))
    reply = await stub.LeaseJobs(request, metadata=metadata, timeout=wait + 10)
    return list(reply.jobs)


def update_request(
    job: jobs_pb2.Job, lease_id: str = "", **fields: object
) -> jobs_pb2.UpdateJobRequest:
    return jobs_pb2.UpdateJobRequest(
        job=jobs_pb2.Job(job_id=job.job_id, **fields),
        update_mask=field_mask_pb2.FieldMask(paths=list(fields)),
        lease_id=lease_id,
    )


async def update(
    stub: jobs_pb2_grpc.JobServiceStub, job: jobs_pb2.Job, lease_id: str = "", **fields: object
) -> jobs_pb2.Job:
    return await stub.UpdateJob(
        update_request(job, lease_id, **fields), metadata=as_profile(job.profile_id)
    )


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


async def first_state(
    stub: jobs_pb2_grpc.JobServiceStub, job: jobs_pb2.Job, status: int
) -> jobs_pb2.Job:
    """The job once it reaches `status`, as WatchJob tells it."""
    watch = stub.WatchJob(
        jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=as_profile(job.profile_id)
    )
    try:
        async for state in watch:
            if state.status == status:
                return state
    finally:
        watch.cancel()
    raise AssertionError(f"job {job.job_id} ended without reaching {status}")


def at(stamp: timestamp_pb2.Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


# Leasing


async def test_lease_moves_a_pending_job_to_processing_under_a_lease(stub, kind):
    job = await create(stub, new_profile_id(), kind)
    before = datetime.now(UTC)
    [leased] = await lease(stub, kind, seconds=30, worker="render-7")
    assert leased.job_id == job.job_id
    assert leased.status == jobs_pb2.PROCESSING
    assert leased.attempt == 1
    assert uuid.UUID(leased.lease.lease_id)
    assert leased.lease.worker == "render-7"
    expires = at(leased.lease.expire_time)
    assert before + timedelta(seconds=29) < expires < before + timedelta(seconds=40)
    [attempt] = leased.attempts
    assert (attempt.attempt, attempt.worker, attempt.outcome) == (1, "render-7", "")
    assert not attempt.HasField("end_time")


async def test_the_lease_id_is_only_in_the_lease_reply(stub, kind):
    job = await create(stub, new_profile_id(), kind)
    await lease(stub, kind)
    read = await stub.GetJob(
        jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=as_profile(job.profile_id)
    )
    assert read.lease.worker == "worker-1"
    assert read.lease.lease_id == ""


async def test_only_the_kinds_asked_are_leased(stub, kind):
    profile_id = new_profile_id()
    await create(stub, profile_id, kind + "-other")
    assert await lease(stub, kind) == []
    job = await create(stub, profile_id, kind)
    assert [j.job_id for j in await lease(stub, kind, kind + "-third")] == [job.job_id]


async def test_concurrent_workers_never_lease_the_same_job(stub, kind):
    profiles = [new_profile_id() for _ in range(6)]
    created = {(await create(stub, p, kind)).job_id for p in profiles for _ in range(20)}

    async def worker(name: str) -> list[str]:
        taken = []
        while batch := await lease(stub, kind, max_jobs=3, worker=name):
            taken += [job.job_id for job in batch]
        return taken

    taken = await asyncio.gather(*(worker(f"worker-{n}") for n in range(8)))
    every = [job_id for batch in taken for job_id in batch]
    assert len(every) == len(set(every))
    assert set(every) == created


async def test_a_job_is_not_leased_before_its_run_after(stub, kind):
    profile_id = new_profile_id()
    later = timestamp_pb2.Timestamp()
    later.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    await create(stub, profile_id, kind, run_after=later)
    assert await lease(stub, kind) == []
    earlier = timestamp_pb2.Timestamp()
    earlier.FromDatetime(datetime.now(UTC) - timedelta(seconds=1))
    ready = await create(stub, profile_id, kind, run_after=earlier)
    assert [j.job_id for j in await lease(stub, kind, max_jobs=5)] == [ready.job_id]


async def test_a_profiles_higher_priority_jobs_are_leased_first_then_the_oldest(stub, kind):
    profile_id = new_profile_id()
    low = await create(stub, profile_id, kind, priority=0)
    high = await create(stub, profile_id, kind, priority=50)
    low_again = await create(stub, profile_id, kind, priority=0)
    order = [(await lease(stub, kind))[0].job_id for _ in range(3)]
    assert order == [high.job_id, low.job_id, low_again.job_id]


async def test_leasing_takes_one_job_of_each_profile_before_a_second_of_any(stub, kind):
    busy = new_profile_id()
    for _ in range(30):
        await create(stub, busy, kind)
    quiet = [new_profile_id() for _ in range(5)]
    for profile_id in quiet:
        await create(stub, profile_id, kind)
    leased = await lease(stub, kind, max_jobs=6)
    assert sorted(job.profile_id for job in leased) == sorted([busy, *quiet])


async def test_profiles_take_turns_when_each_lease_takes_one_job(stub, kind):
    """The busy profile's backlog came first; it is still served once a turn."""
    busy = new_profile_id()
    for _ in range(20):
        await create(stub, busy, kind)
    quiet = [new_profile_id() for _ in range(3)]
    for profile_id in quiet:
        for _ in range(2):
            await create(stub, profile_id, kind)
    served = [(await lease(stub, kind))[0].profile_id for _ in range(8)]
    assert sorted(served[:4]) == sorted([busy, *quiet])
    assert sorted(served[4:]) == sorted([busy, *quiet])


async def test_a_profile_at_its_processing_cap_gets_no_more_leases(database_url, kind):
    policy = LeasePolicy(sweep_seconds=3600, max_processing_per_profile=2)
    async with (
        running(jobs_definition(lease_policy=policy), settings_for(database_url)) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        capped = jobs_pb2_grpc.JobServiceStub(channel)
        busy, other = new_profile_id(), new_profile_id()
        for _ in range(5):
            await create(capped, busy, kind)
        other_job = await create(capped, other, kind)
        leased = await lease(capped, kind, max_jobs=10)
        assert sorted(job.profile_id for job in leased) == sorted([busy, busy, other])
        done = next(job for job in leased if job.profile_id == busy)
        await update(capped, done, done.lease.lease_id, status=jobs_pb2.COMPLETED)
        [next_job] = await lease(capped, kind, max_jobs=10)
        assert next_job.profile_id == busy
        assert other_job.job_id in {job.job_id for job in leased}


async def test_a_waiting_lease_returns_as_soon_as_a_job_is_made(stub, kind):
    waiting = asyncio.create_task(lease(stub, kind, wait=30))
    await asyncio.sleep(0)  # the lease call is on its way before the job exists
    job = await create(stub, new_profile_id(), kind)
    leased = await asyncio.wait_for(waiting, timeout=10)
    assert [j.job_id for j in leased] == [job.job_id]


async def test_a_waiting_lease_returns_empty_when_its_wait_ends(stub, kind):
    assert await lease(stub, kind, wait=0.2) == []


# The holder


async def test_the_holders_update_extends_the_lease(stub, kind):
    await create(stub, new_profile_id(), kind)
    [leased] = await lease(stub, kind, seconds=30)
    updated = await update(stub, leased, leased.lease.lease_id, progress=40)
    assert updated.progress == 40
    assert at(updated.lease.expire_time) > at(leased.lease.expire_time)


async def test_completing_ends_the_lease_and_its_attempt(stub, kind):
    await create(stub, new_profile_id(), kind)
    [leased] = await lease(stub, kind)
    done = await update(stub, leased, leased.lease.lease_id, status=jobs_pb2.COMPLETED)
    assert done.status == jobs_pb2.COMPLETED
    assert not done.HasField("lease")
    [attempt] = done.attempts
    assert attempt.outcome == "COMPLETED"
    assert attempt.HasField("end_time")
    error = await refused(update(stub, leased, leased.lease.lease_id, progress=50))
    assert error.code() == Code.FAILED_PRECONDITION
    assert "no longer held" in error.details()


async def test_a_leased_job_refuses_an_update_without_its_lease(stub, kind):
    await create(stub, new_profile_id(), kind)
    [leased] = await lease(stub, kind, worker="render-2")
    error = await refused(update(stub, leased, progress=10))
    assert error.code() == Code.FAILED_PRECONDITION
    assert "leased to worker render-2" in error.details()


async def test_a_job_that_was_never_leased_takes_updates_without_a_lease(stub, kind):
    job = await create(stub, new_profile_id(), kind)
    assert (await update(stub, job, status=jobs_pb2.PROCESSING)).status == jobs_pb2.PROCESSING


async def test_cancelling_a_leased_job_ends_the_holders_lease(stub, kind):
    await create(stub, new_profile_id(), kind)
    [leased] = await lease(stub, kind)
    cancelled = await stub.CancelJob(
        jobs_pb2.CancelJobRequest(job_id=leased.job_id), metadata=as_profile(leased.profile_id)
    )
    assert cancelled.attempts[-1].outcome == "CANCELLED"
    error = await refused(update(stub, leased, leased.lease.lease_id, status=jobs_pb2.COMPLETED))
    assert error.code() == Code.FAILED_PRECONDITION


async def test_an_unknown_lease_id_is_refused(stub, kind):
    await create(stub, new_profile_id(), kind)
    [leased] = await lease(stub, kind)
    error = await refused(update(stub, leased, str(uuid.uuid4()), progress=10))
    assert error.code() == Code.FAILED_PRECONDITION


# Expiry


async def test_an_expired_lease_puts_the_job_back_after_a_backoff(stub, kind):
    job = await create(stub, new_profile_id(), kind, max_attempts=3)
    [leased] = await lease(stub, kind, seconds=LEASE_SECONDS, worker="died")
    pending = await first_state(stub, job, jobs_pb2.PENDING)
    assert pending.attempt == 1
    assert pending.attempts[0].outcome == "LEASE_EXPIRED"
    assert at(pending.run_after) > at(pending.attempts[0].end_time)
    [again] = await lease(stub, kind, wait=10, worker="second")
    assert again.job_id == job.job_id
    assert again.attempt == 2
    assert [a.worker for a in again.attempts] == ["died", "second"]
    # The first holder comes back too late: its lease is no longer held.
    error = await refused(update(stub, leased, leased.lease.lease_id, status=jobs_pb2.COMPLETED))
    assert error.code() == Code.FAILED_PRECONDITION
    done = await update(stub, again, again.lease.lease_id, status=jobs_pb2.COMPLETED)
    assert done.status == jobs_pb2.COMPLETED


async def test_an_expired_lease_on_the_last_attempt_fails_the_job(stub, kind):
    job = await create(stub, new_profile_id(), kind, max_attempts=1)
    [leased] = await lease(stub, kind, seconds=LEASE_SECONDS, worker="died")
    await update(stub, leased, leased.lease.lease_id, error="ran out of memory")
    failed = await first_state(stub, job, jobs_pb2.FAILED)
    assert "attempt 1 of 1" in failed.error
    assert "ran out of memory" in failed.error
    assert failed.attempts[-1].outcome == "LEASE_EXPIRED"


async def test_sweeps_running_at_once_on_every_replica_move_each_expired_job_once(
    database_url, stub, kind
):
    profile_id = new_profile_id()
    for _ in range(20):
        await create(stub, profile_id, kind)
    leased = await lease(stub, kind, max_jobs=20, seconds=3600)
    ids = [uuid.UUID(job.job_id) for job in leased]
    # Their leases end now (as the schema's owner would see time pass), and four sweeps run
    # at once, beside the service's own.
    owner = await asyncpg.connect(database_url)
    try:
        await owner.execute(
            "UPDATE jobs.jobs SET lease_expire_time = now() - interval '1 second' "
            "WHERE job_id = ANY($1::uuid[])",
            ids,
        )
    finally:
        await owner.close()

    async def sweep() -> int:
        connection = await asyncpg.connect(database_url)
        try:
            return await connection.fetchval("SELECT jobs.reclaim_leases(100, 0.2, 1)")
        finally:
            await connection.close()

    assert sum(await asyncio.gather(*(sweep() for _ in range(4)))) <= len(ids)
    for job in leased:
        state = await stub.GetJob(
            jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=as_profile(profile_id)
        )
        assert [a.outcome for a in state.attempts] == ["LEASE_EXPIRED"]
        assert (state.status, state.attempt) == (jobs_pb2.PENDING, 1)


# Input


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({}, "kinds"),
        ({"kinds": ["k"], "lease_duration": duration_pb2.Duration(nanos=500_000_000)}, "lease"),
        ({"kinds": ["k"], "lease_duration": duration_pb2.Duration(seconds=7200)}, "lease"),
        ({"kinds": ["k"], "wait": duration_pb2.Duration(seconds=-1)}, "wait"),
        ({"kinds": ["k"] * 21}, "kinds"),
        ({"kinds": ["k\x00"]}, "kinds"),
    ],
)
async def test_a_lease_request_out_of_bounds_is_invalid(stub, request_fields, field):
    error = await refused(stub.LeaseJobs(jobs_pb2.LeaseJobsRequest(**request_fields)))
    assert error.code() == Code.INVALID_ARGUMENT
    assert field in error.details()


@pytest.mark.parametrize(
    ("job_fields", "field"),
    [({"priority": 101}, "job.priority"), ({"max_attempts": 101}, "job.max_attempts")],
)
async def test_scheduling_fields_out_of_bounds_are_invalid(stub, kind, job_fields, field):
    error = await refused(create(stub, new_profile_id(), kind, **job_fields))
    assert error.code() == Code.INVALID_ARGUMENT
    assert field in error.details()


# Who may lease (AUTH_MODE=jwt)


def worker_token() -> str:
    return token_for(worker=True)


async def test_a_worker_token_leases_and_updates_a_job_of_a_profile_it_does_not_name(
    jwt_jobs_stub, kind
):
    profile_id = new_profile_id()
    await jwt_jobs_stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind=kind)), metadata=signed_in(profile_id)
    )
    [leased] = await lease(jwt_jobs_stub, kind, metadata=(bearer(worker_token()),))
    assert leased.profile_id == profile_id
    metadata = (*as_profile(profile_id), bearer(worker_token()))
    done = await jwt_jobs_stub.UpdateJob(
        update_request(leased, leased.lease.lease_id, status=jobs_pb2.COMPLETED),
        metadata=metadata,
    )
    assert done.status == jobs_pb2.COMPLETED


async def test_a_worker_token_must_name_its_lease_to_update(jwt_jobs_stub, kind):
    profile_id = new_profile_id()
    job = await jwt_jobs_stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind=kind)), metadata=signed_in(profile_id)
    )
    metadata = (*as_profile(profile_id), bearer(worker_token()))
    error = await refused(
        jwt_jobs_stub.UpdateJob(update_request(job, progress=5), metadata=metadata)
    )
    assert error.code() == Code.PERMISSION_DENIED
    assert "lease_id" in error.details()


async def test_a_worker_token_cannot_update_a_job_it_does_not_hold(jwt_jobs_stub, kind):
    profile_id = new_profile_id()
    job = await jwt_jobs_stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind=kind)), metadata=signed_in(profile_id)
    )
    metadata = (*as_profile(profile_id), bearer(worker_token()))
    error = await refused(
        jwt_jobs_stub.UpdateJob(
            update_request(job, str(uuid.uuid4()), progress=5), metadata=metadata
        )
    )
    assert error.code() == Code.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("method", "request_message"),
    [
        ("GetJob", jobs_pb2.GetJobRequest(job_id=str(uuid.uuid4()))),
        ("CreateJob", jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k"))),
        ("ListJobs", jobs_pb2.ListJobsRequest()),
        ("CancelJob", jobs_pb2.CancelJobRequest(job_id=str(uuid.uuid4()))),
        ("DeleteJob", jobs_pb2.DeleteJobRequest(job_id=str(uuid.uuid4()))),
        ("ListAllJobs", jobs_pb2.ListJobsRequest()),
    ],
)
async def test_a_worker_token_is_refused_everywhere_else(jwt_jobs_stub, method, request_message):
    metadata = (*as_profile(new_profile_id()), bearer(worker_token()))
    error = await refused(getattr(jwt_jobs_stub, method)(request_message, metadata=metadata))
    assert error.code() == Code.PERMISSION_DENIED


@pytest.mark.parametrize("token", ["profile", "operator"])
async def test_only_a_worker_token_may_lease(jwt_jobs_stub, kind, token):
    profile_id = new_profile_id()
    minted = token_for(profile_id) if token == "profile" else token_for(operator=True)
    error = await refused(lease(jwt_jobs_stub, kind, metadata=(bearer(minted),)))
    assert error.code() == Code.PERMISSION_DENIED
    assert "scope worker" in error.details()


# The operator's view


async def test_queue_stats_show_pending_and_leased_jobs_by_kind_and_profile(stub, kind):
    busy, quiet = new_profile_id(), new_profile_id()
    for _ in range(3):
        await create(stub, busy, kind)
    later = timestamp_pb2.Timestamp()
    later.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    await create(stub, busy, kind, run_after=later)
    await create(stub, quiet, kind)
    [leased] = await lease(stub, kind, seconds=30, worker="stats-worker")
    stats = await stub.GetQueueStats(jobs_pb2.GetQueueStatsRequest(limit=1000))
    mine = {q.profile_id: q for q in stats.queues if q.kind == kind}
    held, waiting = (busy, quiet) if leased.profile_id == busy else (quiet, busy)
    assert (mine[held].leased, mine[waiting].leased) == (1, 0)
    assert mine[busy].pending + mine[quiet].pending == 4
    assert mine[busy].pending - mine[busy].ready == 1  # run_after an hour away
    assert mine[quiet].HasField("oldest_pending_create_time") == (waiting == quiet)
    [expiring] = [e for e in stats.expiring_leases if e.job_id == leased.job_id]  # in 60 s
    assert (expiring.worker, expiring.attempt, expiring.kind) == ("stats-worker", 1, kind)
    request = jobs_pb2.GetQueueStatsRequest(limit=1000)
    request.expiring_within.FromTimedelta(timedelta(seconds=10))
    later_leases = (await stub.GetQueueStats(request)).expiring_leases
    assert leased.job_id not in {e.job_id for e in later_leases}


async def test_queue_stats_need_an_operator_token(jwt_jobs_stub):
    for minted in (token_for(new_profile_id()), worker_token()):
        error = await refused(
            jwt_jobs_stub.GetQueueStats(jobs_pb2.GetQueueStatsRequest(), metadata=(bearer(minted),))
        )
        assert error.code() == Code.PERMISSION_DENIED
    stats = await jwt_jobs_stub.GetQueueStats(
        jobs_pb2.GetQueueStatsRequest(), metadata=(bearer(token_for(operator=True)),)
    )
    assert isinstance(stats, jobs_pb2.QueueStats)


async def test_a_worker_reads_a_job_under_a_lease_it_was_given_even_once_ended(jwt_jobs_stub, kind):
    profile_id = new_profile_id()
    await jwt_jobs_stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind=kind)), metadata=signed_in(profile_id)
    )
    await jwt_jobs_stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind=kind)), metadata=signed_in(profile_id)
    )
    worker = (bearer(worker_token()),)
    first, second = await lease(jwt_jobs_stub, kind, max_jobs=2, metadata=worker)
    metadata = (*as_profile(profile_id), *worker)
    read = jobs_pb2.GetJobRequest(job_id=first.job_id, lease_id=first.lease.lease_id)
    assert (await jwt_jobs_stub.GetJob(read, metadata=metadata)).job_id == first.job_id
    await jwt_jobs_stub.UpdateJob(
        update_request(first, first.lease.lease_id, status=jobs_pb2.COMPLETED), metadata=metadata
    )
    assert (await jwt_jobs_stub.GetJob(read, metadata=metadata)).status == jobs_pb2.COMPLETED
    # Another job's lease proves nothing about this one.
    crossed = jobs_pb2.GetJobRequest(job_id=first.job_id, lease_id=second.lease.lease_id)
    error = await refused(jwt_jobs_stub.GetJob(crossed, metadata=metadata))
    assert error.code() == Code.NOT_FOUND
