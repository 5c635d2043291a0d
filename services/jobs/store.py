"""SQL for the jobs schema. Every method runs in one tenant-scoped transaction."""

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from services.jobs.model import (
    Attempt,
    Document,
    HeldLease,
    Job,
    JobChanges,
    JobFilter,
    JobStatus,
    Lease,
    Queue,
    Schedule,
)
from services.runtime.database import TenantScopedPool
from services.runtime.errors import NotFound

DEFAULT_SCHEDULE = Schedule()

# A job's scheduling and lease columns (migration 0007), read as they are.
_SCHEDULING = (
    "run_after, priority, max_attempts, attempt, lease_worker, lease_expire_time, attempts"
)

# Every stored column a Job is made from; data and result also as Struct bytes (data_pb,
# result_pb; migration 0004).
_STORED = (
    "job_id, profile_id, kind, status, progress, message, data, result, data_pb, result_pb, "
    "error, create_time, update_time, version, " + _SCHEDULING
)


def _read_columns(whole: str = "") -> str:
    """The select list of a Job (_job) from _STORED columns: data and result as Struct bytes,
    their JSON only for a row without the bytes. With `whole` (an SQL condition), the large
    columns come back NULL where it is false."""
    when = f"{whole} AND " if whole else ""
    return (
        f"job_id, profile_id, kind, status, progress, create_time, update_time, version, "
        f"{_SCHEDULING}, "
        f"CASE WHEN {when}TRUE THEN message END AS message, "
        f"CASE WHEN {when}TRUE THEN error END AS error, "
        f"CASE WHEN {when}TRUE THEN data_pb END AS data_pb, "
        f"CASE WHEN {when}data_pb IS NULL THEN data END AS data, "
        f"CASE WHEN {when}TRUE THEN result_pb END AS result_pb, "
        f"CASE WHEN {when}result_pb IS NULL THEN result END AS result"
    )


_COLUMNS = _read_columns()


def _attempt(entry: dict[str, Any]) -> Attempt:
    end_time = entry.get("end_time")
    return Attempt(
        attempt=entry["attempt"],
        worker=entry["worker"],
        start_time=datetime.fromisoformat(entry["start_time"]),
        end_time=None if end_time is None else datetime.fromisoformat(end_time),
        outcome=entry.get("outcome", ""),
        error=entry.get("error", ""),
    )


# A row's status as its JobStatus: a lookup, where JobStatus(value) runs Python per call.
_STATUSES = {status.value: status for status in JobStatus}


def _job(row: asyncpg.Record, lease_id: uuid.UUID | None = None) -> Job:
    expire_time = row["lease_expire_time"]
    return Job(
        job_id=row["job_id"],
        profile_id=row["profile_id"],
        kind=row["kind"],
        status=_STATUSES[row["status"]],
        progress=row["progress"],
        message=row["message"],
        data=Document(row["data"], row["data_pb"]),
        result=Document(row["result"], row["result_pb"]),
        error=row["error"],
        create_time=row["create_time"],
        update_time=row["update_time"],
        version=row["version"],
        schedule=Schedule(row["run_after"], row["priority"], row["max_attempts"]),
        attempt=row["attempt"],
        lease=None if expire_time is None else Lease(row["lease_worker"], expire_time, lease_id),
        attempts=tuple(_attempt(entry) for entry in row["attempts"]),
    )


# The sweeps' share of the pool (expired leases, retention): one key, whichever replica and
# however many jobs.
_SWEEP_SHARE = "(sweeps)"


def _not_found(job_id: uuid.UUID) -> NotFound:
    return NotFound(f"job {job_id} not found")


# A job no larger than this (data, result, message and error) comes back whole from the first
# SELECT of a page; 501 of them are 4 MB at most.
SMALL_JOB_BYTES = 8192


def _matching_jobs(
    profile_id: str | None,
    job_filter: JobFilter,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
    bind: Callable[[Any], str],
) -> str:
    """A subquery: limit + 1 of the matching jobs, newest first.

    They are read as one range per status, each newest first with LIMIT, merged (Merge
    Append): by jobs_by_status_newest_first for the statuses asked, or by
    jobs_by_kind_status_newest_first for a kind (with every status when none is asked), so a
    rare status or kind is found without walking the profile's other jobs.
    """
    conditions = ["TRUE"] if profile_id is None else [f"profile_id = {bind(profile_id)}"]
    if job_filter.kind:
        conditions.append(f"kind = {bind(job_filter.kind)}")
    if job_filter.create_time_start:
        conditions.append(f"create_time >= {bind(job_filter.create_time_start)}")
    if job_filter.create_time_end:
        conditions.append(f"create_time < {bind(job_filter.create_time_end)}")
    if after:
        conditions.append(f"(create_time, job_id) < ({bind(after[0])}, {bind(after[1])})")
    read = bind(limit + 1)
    statuses = job_filter.statuses or (tuple(JobStatus) if job_filter.kind else ())
    branches = [
        f"""(SELECT {_STORED} FROM jobs.jobs
            WHERE {" AND ".join([*conditions, status])}
            ORDER BY create_time DESC, job_id DESC LIMIT {read})"""
        for status in [f"status = {bind(str(s))}" for s in statuses] or ["TRUE"]
    ]
    if len(branches) == 1:
        return branches[0]
    return f"""(SELECT * FROM ({" UNION ALL ".join(branches)}) AS branches
        ORDER BY create_time DESC, job_id DESC LIMIT {read})"""


def _binder(arguments: list[Any]) -> Callable[[Any], str]:
    def bind(value: Any) -> str:
        arguments.append(value)
        return f"${len(arguments)}"

    return bind


_STRUCTS = ("data", "result")


def _stored(column: str, of_bytes: str, of_json: str) -> str:
    """An SQL expression of the form of a Struct column that is read (_read_columns): its
    bytes, else its JSON; `of_bytes` and `of_json` name the column as {}."""
    return (
        f"CASE WHEN {column}_pb IS NULL THEN {of_json.format(column)} "
        f"ELSE {of_bytes.format(column + '_pb')} END"
    )


def _stored_bytes(of_bytes: str, of_json: str) -> str:
    """The size of what is read of a job's large columns: the Struct columns measured as
    _stored, the texts by octet_length."""
    return " + ".join(
        [_stored(c, of_bytes, of_json) for c in _STRUCTS]
        + [f"octet_length({c})" for c in ("message", "error")]
    )


def list_query(
    profile_id: str | None,
    job_filter: JobFilter,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
) -> tuple[str, list[Any]]:
    """The first SELECT of a page (JobStore.list) and its arguments; every profile's jobs when
    profile_id is None: limit + 1 jobs, each with `small`, and the large columns of a job
    that is not small left out (NULL), so that this read is bounded too. Telling a job small
    costs Postgres no decompression: an uncompressed value's stored size is its size."""
    arguments: list[Any] = []
    matching = _matching_jobs(profile_id, job_filter, limit, after, _binder(arguments))
    uncompressed = " AND ".join(
        _stored(c, "pg_column_compression({}) IS NULL", "pg_column_compression({}) IS NULL")
        for c in _STRUCTS
    )
    query = f"""
        SELECT {_read_columns(whole="small")}, small FROM (
            SELECT {_STORED},
                {uncompressed}
                AND {_stored_bytes("pg_column_size({})", "pg_column_size({})")}
                    <= {SMALL_JOB_BYTES} AS small
            FROM {matching} AS matching
        ) AS sized
        ORDER BY create_time DESC, job_id DESC
    """
    return query, arguments


def list_query_by_bytes(
    profile_id: str | None,
    job_filter: JobFilter,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
    max_bytes: int,
) -> tuple[str, list[Any]]:
    """The SELECT of a page of jobs that are not all small, and its arguments: up to `limit`
    whole jobs, each with `followed` (whether another matching job comes after it).

    The rows stop early once the jobs before one already hold `max_bytes` of data, result,
    message and error (their Struct bytes, else JSON, and text sizes, measured in Postgres),
    so a page of jobs
    with megabytes of data each is never read whole: what comes back is bounded by max_bytes
    plus one job, whatever `limit` asks. Measuring renders the JSON of at most limit + 1 jobs
    in Postgres, which is why small pages do without it.
    """
    arguments: list[Any] = []
    bind = _binder(arguments)
    matching = _matching_jobs(profile_id, job_filter, limit, after, bind)
    query = f"""
        SELECT {_COLUMNS}, followed FROM (
            SELECT {_STORED},
                coalesce(
                    sum({_stored_bytes("octet_length({})", "octet_length({}::text)")})
                    OVER before,
                    0
                ) AS bytes_before,
                lead(TRUE, 1, FALSE) OVER newest_first AS followed
            FROM {matching} AS matching
            WINDOW newest_first AS (ORDER BY create_time DESC, job_id DESC),
                before AS (newest_first ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
            ORDER BY create_time DESC, job_id DESC
            LIMIT {bind(limit)}
        ) AS page
        WHERE bytes_before < {bind(max_bytes)}
        ORDER BY create_time DESC, job_id DESC
    """
    return query, arguments


class JobStore:
    """The jobs schema's SQL. Every method takes the profile it acts for first. CreateJob,
    GetJob, UpdateJob and CancelJob are one statement each, one round trip: a function of the
    schema (migration 0005) that scopes its own transaction and holds the rules of a job's
    life. Deleting and listing run in a tenant-scoped transaction."""

    def __init__(self, pool: TenantScopedPool) -> None:
        self._pool = pool

    async def create(
        self,
        profile_id: str,
        kind: str,
        data: Document,
        request_id: str | None,
        schedule: Schedule = DEFAULT_SCHEDULE,
    ) -> Job:
        """Inserts a job; with a request_id already used by this profile, returns that job."""
        rows = await self._pool.call(
            profile_id,
            "SELECT * FROM jobs.create_job($1, $2, $3, $4, $5, $6, $7, $8)",
            profile_id,
            request_id,
            kind,
            data.values,
            data.encoded,
            schedule.run_after,
            schedule.priority,
            schedule.max_attempts,
        )
        return _job(rows[0])

    async def get(
        self, profile_id: str, job_id: uuid.UUID, lease_id: uuid.UUID | None = None
    ) -> Job:
        """The job; with a lease_id, only if that lease was granted on it (NotFound
        otherwise), whether it still runs or has ended."""
        if lease_id is None:
            rows = await self._pool.call(
                profile_id, "SELECT * FROM jobs.get_job($1, $2)", profile_id, job_id
            )
        else:
            rows = await self._pool.call(
                profile_id,
                "SELECT * FROM jobs.get_leased_job($1, $2, $3)",
                profile_id,
                job_id,
                lease_id,
            )
        if not rows:
            raise _not_found(job_id)
        return _job(rows[0])

    async def update(
        self,
        profile_id: str,
        job_id: uuid.UUID,
        changes: JobChanges,
        etag: int | None,
        lease_id: uuid.UUID | None = None,
    ) -> Job:
        """Applies the changes atomically, as the job's life allows (FailedPrecondition
        otherwise); an etag that is not the job's version raises Conflict. A held job takes
        changes only with its lease_id, which they extend (or end, with a final status);
        FailedPrecondition for any other."""
        values = changes.values
        status = values.get("status")
        data: Document | None = values.get("data")
        result: Document | None = values.get("result")
        rows = await self._pool.call(
            profile_id,
            "SELECT * FROM jobs.update_job($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            profile_id,
            job_id,
            etag,
            None if status is None else str(status),
            values.get("progress"),
            values.get("message"),
            values.get("error"),
            None if data is None else data.values,
            None if data is None else data.encoded,
            None if result is None else result.values,
            None if result is None else result.encoded,
            lease_id,
        )
        return _job(rows[0])

    async def cancel(self, profile_id: str, job_id: uuid.UUID) -> Job:
        """Moves the job to CANCELLED; cancelling a cancelled job changes nothing."""
        rows = await self._pool.call(
            profile_id, "SELECT * FROM jobs.cancel_job($1, $2)", profile_id, job_id
        )
        return _job(rows[0])

    async def lease(
        self,
        share: str,
        worker: str,
        kinds: Sequence[str],
        max_jobs: int,
        lease_seconds: float,
        max_processing: int,
        max_bytes: int,
    ) -> list[Job]:
        """Up to max_jobs pending jobs of any profile moved to PROCESSING under a lease for
        `worker`, profiles taking turns (jobs.lease_jobs), fewer once they hold more than
        `max_bytes`; each Job's lease carries its lease_id. `share` is whose share of the
        pool the statement counts against."""
        rows = await self._pool.call(
            share,
            "SELECT (reply).*, granted_lease FROM jobs.lease_jobs($1, $2, $3, $4, $5, $6)",
            worker,
            list(kinds),
            max_jobs,
            lease_seconds,
            max_processing,
            max_bytes,
        )
        return [_job(row, row["granted_lease"]) for row in rows]

    async def reclaim_leases(self, limit: int, retry_base: float, retry_max: float) -> int:
        """Ends up to `limit` expired leases (jobs.reclaim_leases): each job back to PENDING
        after a backoff, or FAILED past its max_attempts. How many it moved."""
        rows = await self._pool.call(
            _SWEEP_SHARE,
            "SELECT jobs.reclaim_leases($1, $2, $3) AS moved",
            limit,
            retry_base,
            retry_max,
        )
        return rows[0]["moved"]

    async def delete_finished_jobs(self, before: datetime, limit: int) -> int:
        """Deletes up to `limit` finished jobs of any profile last changed before `before`,
        oldest first (jobs.delete_finished_jobs): how many."""
        rows = await self._pool.call(
            _SWEEP_SHARE,
            "SELECT jobs.delete_finished_jobs($1, $2) AS deleted",
            before,
            limit,
        )
        return rows[0]["deleted"]

    async def queue_stats(
        self, limit: int, expiring_within_seconds: float
    ) -> tuple[list[Queue], list[HeldLease]]:
        """Every profile's pending and leased jobs by kind (most pending first), and the
        leases that expire within the time given, soonest first; `limit` of each. An
        operator's read: it walks the pending jobs (their partial index) and the leases."""
        async with self._pool.cross_profile_transaction() as connection:
            queues = await connection.fetch(
                """
                SELECT kind, profile_id, coalesce(pending.pending, 0) AS pending,
                    coalesce(pending.ready, 0) AS ready, pending.oldest,
                    coalesce(leased.leased, 0) AS leased
                FROM (
                    SELECT kind, profile_id, count(*) AS pending,
                        count(*) FILTER (
                            WHERE run_after IS NULL OR run_after <= clock_timestamp()
                        ) AS ready,
                        min(create_time) AS oldest
                    FROM jobs.jobs WHERE status = 'PENDING' GROUP BY kind, profile_id
                ) AS pending
                FULL JOIN (
                    SELECT kind, profile_id, count(*) AS leased
                    FROM jobs.jobs WHERE lease_expire_time IS NOT NULL GROUP BY kind, profile_id
                ) AS leased USING (kind, profile_id)
                ORDER BY 3 DESC, kind, profile_id
                LIMIT $1
                """,
                limit,
            )
            leases = await connection.fetch(
                """
                SELECT job_id, profile_id, kind, lease_worker, lease_expire_time, attempt
                FROM jobs.jobs
                WHERE lease_expire_time IS NOT NULL
                    AND lease_expire_time < clock_timestamp() + make_interval(secs => $1)
                ORDER BY lease_expire_time
                LIMIT $2
                """,
                expiring_within_seconds,
                limit,
            )
        return (
            [
                Queue(
                    r["kind"], r["profile_id"], r["pending"], r["ready"], r["oldest"], r["leased"]
                )
                for r in queues
            ],
            [
                HeldLease(
                    r["job_id"],
                    r["profile_id"],
                    r["kind"],
                    r["lease_worker"],
                    r["lease_expire_time"],
                    r["attempt"],
                )
                for r in leases
            ],
        )

    async def delete(self, profile_id: str, job_id: uuid.UUID) -> None:
        async with self._pool.transaction(profile_id) as connection:
            deleted = await connection.fetchval(
                "DELETE FROM jobs.jobs WHERE profile_id = $1 AND job_id = $2 RETURNING job_id",
                profile_id,
                job_id,
            )
        if deleted is None:
            raise _not_found(job_id)

    async def count(self, profile_id: str) -> int:
        """How many jobs the profile holds, whatever their status."""
        async with self._pool.transaction(profile_id, readonly=True) as connection:
            return await connection.fetchval(
                "SELECT count(*) FROM jobs.jobs WHERE profile_id = $1", profile_id
            )

    async def delete_some(self, profile_id: str, limit: int) -> int:
        """Deletes up to `limit` of the profile's jobs, whatever their status: how many. The
        profile's turns in the work queue go at the next lease that finds them without work."""
        async with self._pool.transaction(profile_id) as connection:
            return await connection.fetchval(
                """
                WITH deleted AS (
                    DELETE FROM jobs.jobs WHERE profile_id = $1 AND job_id IN (
                        SELECT job_id FROM jobs.jobs WHERE profile_id = $1 LIMIT $2
                    )
                    RETURNING 1
                )
                SELECT count(*) FROM deleted
                """,
                profile_id,
                limit,
            )

    async def list(
        self,
        profile_id: str | None,
        job_filter: JobFilter,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None,
        *,
        max_bytes: int,
    ) -> tuple[list[Job], bool]:
        """Up to `limit` jobs newest first, strictly after the (create_time, job_id) given, and
        whether more jobs match after them.

        Memory stays bounded whatever the jobs hold: a page of small jobs is read in one
        SELECT (list_query); when it meets a large one, the page is read again with the
        rows cut at `max_bytes` in Postgres (list_query_by_bytes), so fewer than `limit`
        jobs may come back, `more` then saying that others follow.

        With no profile (an operator's call only) every profile's jobs are read, read only.
        """
        transaction = (
            self._pool.cross_profile_transaction()
            if profile_id is None
            else self._pool.transaction(profile_id, readonly=True)
        )
        first_read = list_query(profile_id, job_filter, limit, after)
        async with transaction as connection:
            rows = await connection.fetch(first_read[0], *first_read[1])
            if all(row["small"] for row in rows):
                return [_job(row) for row in rows[:limit]], len(rows) > limit
            query, arguments = list_query_by_bytes(profile_id, job_filter, limit, after, max_bytes)
            rows = await connection.fetch(query, *arguments)
        return [_job(row) for row in rows], bool(rows) and rows[-1]["followed"]
