"""jobs.v1.JobService: validates requests and converts between messages and the model."""

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime

from google.protobuf import duration_pb2, empty_pb2, struct_pb2
from grpc.aio import ServicerContext
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from services.jobs.model import (
    UPDATABLE_FIELDS,
    Document,
    Job,
    JobChanges,
    JobFilter,
    JobStatus,
    Schedule,
)
from services.jobs.store import JobStore
from services.jobs.watch import JobWatchHub
from services.runtime.call_context import (
    Caller,
    current_caller,
    remaining_seconds,
    require_profile_id,
)
from services.runtime.errors import InvalidArgument, PermissionDenied
from services.runtime.fields import (
    MAX_STRUCT_BYTES,
    at_most,
    struct_dict,
    struct_message,
    text,
    timestamp_datetime,
    timestamp_message,
)
from services.runtime.lifecycle import EXPORT_PAGE_ROWS, delete_in_batches, log_deleted
from services.runtime.page_tokens import decode_page_token, page_size
from services.runtime.paging import encoded_page
from services.runtime.turns import cpu_turn

MAX_KIND_LENGTH = 100
MAX_TEXT_LENGTH = 10_000
MAX_REQUEST_ID_LENGTH = 128
MAX_ETAG_LENGTH = 64
# Longer than any path UpdateJob knows, short enough to name in a refusal.
MAX_PATH_LENGTH = 64
# A filter names each status at most once.
MAX_STATUSES = len(JobStatus)
MAX_PRIORITY = 100
DEFAULT_MAX_ATTEMPTS = 5
MAX_ATTEMPTS = 100
# The most a job's fields weigh in a reply: data and result at their byte budgets, message
# and error at their length (4 bytes a character at most), and room for the rest.
LARGEST_JOB_BYTES = 2 * MAX_STRUCT_BYTES + 2 * 4 * MAX_TEXT_LENGTH + 8192
# LeaseJobs: what one call may ask for.
MAX_LEASE_KINDS = 20
MAX_JOBS_PER_LEASE = 100
MAX_WORKER_LENGTH = 128
DEFAULT_LEASE_SECONDS = 60.0
MIN_LEASE_SECONDS = 1.0
MAX_LEASE_SECONDS = 3600.0
MAX_LEASE_WAIT_SECONDS = 60.0
# GetQueueStats: entries of each list, and the window of leases about to expire.
DEFAULT_QUEUE_STATS = 50
MAX_QUEUE_STATS = 1000
DEFAULT_EXPIRING_WITHIN_SECONDS = 60.0
MAX_EXPIRING_WITHIN_SECONDS = 86400.0
# A waiting LeaseJobs looks again at least this often: a job whose run_after has come (no
# notification says so) or a notification missed while the listener reconnected.
LEASE_RECHECK_SECONDS = 1.0
# A waiting LeaseJobs returns this long before its deadline, so that its reply arrives in time.
LEASE_REPLY_MARGIN_SECONDS = 0.5


def job_message(job: Job) -> jobs_pb2.Job:
    message = jobs_pb2.Job(
        job_id=str(job.job_id),
        profile_id=job.profile_id,
        kind=job.kind,
        status=jobs_pb2.JobStatus.Value(job.status),
        progress=job.progress,
        message=job.message,
        error=job.error,
        create_time=timestamp_message(job.create_time),
        update_time=timestamp_message(job.update_time),
        etag=job.etag,
        priority=job.schedule.priority,
        max_attempts=job.schedule.max_attempts,
        attempt=job.attempt,
    )
    _fill(message.data, job.data)
    _fill(message.result, job.result)
    if job.schedule.run_after is not None:
        message.run_after.CopyFrom(timestamp_message(job.schedule.run_after))
    if job.lease is not None:
        message.lease.worker = job.lease.worker
        message.lease.expire_time.CopyFrom(timestamp_message(job.lease.expire_time))
        if job.lease.lease_id is not None:
            message.lease.lease_id = str(job.lease.lease_id)
    for attempt in job.attempts:
        entry = message.attempts.add(
            attempt=attempt.attempt,
            worker=attempt.worker,
            start_time=timestamp_message(attempt.start_time),
            outcome=attempt.outcome,
            error=attempt.error,
        )
        if attempt.end_time is not None:
            entry.end_time.CopyFrom(timestamp_message(attempt.end_time))
    return message


def _fill(struct: struct_pb2.Struct, document: Document) -> None:
    """The Struct from the document's bytes (parsed in C), else from its values."""
    if document.encoded is not None:
        struct.MergeFromString(document.encoded)
    elif document.values:
        struct.CopyFrom(struct_message(document.values))


def document(struct: struct_pb2.Struct, field: str) -> Document:
    """A request's Struct, checked (fields.struct_dict), as its values and its bytes; fields
    protobuf did not know are dropped first, so the bytes hold nothing the values do not."""
    values = struct_dict(struct, field)
    struct.DiscardUnknownFields()
    return Document(values, struct.SerializeToString())


async def _reply(job: Job) -> jobs_pb2.Job:
    """The job's message, built in the profile's turn: a job at its value budgets costs
    milliseconds of CPU to convert."""
    async with cpu_turn():
        return job_message(job)


def parse_job_id(value: str, field: str = "job_id") -> uuid.UUID:
    if not value:
        raise InvalidArgument(f"{field} is required")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(f"{field} must be a UUID, got {value[:64]!r}") from None


def _status(value: int, field: str) -> JobStatus:
    if value == jobs_pb2.JOB_STATUS_UNSPECIFIED or value not in jobs_pb2.JobStatus.values():
        raise InvalidArgument(f"{field} must be one of {', '.join(JobStatus)}")
    return JobStatus(jobs_pb2.JobStatus.Name(value))


def _etag(value: str) -> int | None:
    """The version an etag names (None when empty); InvalidArgument for one this service
    never gave."""
    etag = _name(value, "job.etag", MAX_ETAG_LENGTH)
    if not etag:
        return None
    if not etag.isascii() or not etag.isdigit():
        raise InvalidArgument(f"job.etag must be an etag this service returned, got {etag!r}")
    return int(etag)


def _schedule(job: jobs_pb2.Job) -> Schedule:
    if not 0 <= job.priority <= MAX_PRIORITY:
        raise InvalidArgument(
            f"job.priority must be between 0 and {MAX_PRIORITY}, got {job.priority}"
        )
    max_attempts = job.max_attempts or DEFAULT_MAX_ATTEMPTS
    if not 1 <= max_attempts <= MAX_ATTEMPTS:
        raise InvalidArgument(
            f"job.max_attempts must be between 1 and {MAX_ATTEMPTS} (0 means "
            f"{DEFAULT_MAX_ATTEMPTS}), got {job.max_attempts}"
        )
    return Schedule(
        run_after=(
            timestamp_datetime(job.run_after, "job.run_after")
            if job.HasField("run_after")
            else None
        ),
        priority=job.priority,
        max_attempts=max_attempts,
    )


def _seconds(duration: duration_pb2.Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def _lease_seconds(duration: duration_pb2.Duration) -> float:
    seconds = _seconds(duration) or DEFAULT_LEASE_SECONDS
    if not MIN_LEASE_SECONDS <= seconds <= MAX_LEASE_SECONDS:
        raise InvalidArgument(
            f"lease_duration must be between {MIN_LEASE_SECONDS:g}s and {MAX_LEASE_SECONDS:g}s "
            f"(0 means {DEFAULT_LEASE_SECONDS:g}s), got {seconds:g}s"
        )
    return seconds


def _wait_seconds(duration: duration_pb2.Duration) -> float:
    """What the caller asked for, at most MAX_LEASE_WAIT_SECONDS and its deadline."""
    seconds = _seconds(duration)
    if seconds < 0:
        raise InvalidArgument(f"wait must not be negative, got {seconds:g}s")
    seconds = min(seconds, MAX_LEASE_WAIT_SECONDS)
    remaining = remaining_seconds()
    if remaining is not None:
        seconds = min(seconds, remaining - LEASE_REPLY_MARGIN_SECONDS)
    return max(seconds, 0.0)


def _lease_id(value: str, caller: Caller | None) -> uuid.UUID | None:
    """The lease a call acts under; a worker's token must name one: it acts for a profile
    only on the jobs it holds."""
    if not value:
        if caller is not None and caller.worker:
            raise PermissionDenied(
                "a worker token acts only on jobs it holds: send the lease_id LeaseJobs gave"
            )
        return None
    return parse_job_id(value, "lease_id")


def _name(value: str, field: str, limit: int) -> str:
    return text(value, field, limit=limit)


def _free_text(value: str, field: str) -> str:
    return text(value, field, limit=MAX_TEXT_LENGTH, free_text=True)


def _changes(job: jobs_pb2.Job, paths: list[str]) -> JobChanges:
    if not paths:
        raise InvalidArgument(
            f"update_mask is required; allowed paths: {', '.join(UPDATABLE_FIELDS)}"
        )
    values: dict = {}
    for path in paths:
        if path == "status":
            values["status"] = _status(job.status, "job.status")
        elif path == "progress":
            values["progress"] = job.progress
        elif path in ("message", "error"):
            values[path] = _free_text(getattr(job, path), f"job.{path}")
        elif path in ("data", "result"):
            values[path] = document(getattr(job, path), f"job.{path}")
        else:  # JobChanges names the unknown path
            values[_name(path, "update_mask.paths", MAX_PATH_LENGTH)] = None
    return JobChanges(values)


def _filter(request: jobs_pb2.ListJobsRequest) -> JobFilter:
    def time_or_none(field: str) -> datetime | None:
        if not request.HasField(field):
            return None
        return timestamp_datetime(getattr(request, field), field)

    statuses = at_most(request.statuses, "statuses", MAX_STATUSES)
    return JobFilter(
        statuses=tuple(sorted({_status(s, "statuses") for s in statuses})),
        kind=_name(request.kind, "kind", MAX_KIND_LENGTH),
        create_time_start=time_or_none("create_time_start"),
        create_time_end=time_or_none("create_time_end"),
    )


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(
        self,
        store: JobStore,
        watch_hub: JobWatchHub[jobs_pb2.Job],
        reply_bytes: int,
        max_processing_per_profile: int = 0,
    ) -> None:
        """`reply_bytes`: the most a list reply's rows may take (paging.reply_budget);
        `max_processing_per_profile`: LeasePolicy's."""
        self._store = store
        self._watch_hub = watch_hub
        self._reply_bytes = reply_bytes
        self._max_processing = max_processing_per_profile

    async def CreateJob(
        self, request: jobs_pb2.CreateJobRequest, context: ServicerContext
    ) -> jobs_pb2.Job:
        kind = _name(request.job.kind.strip(), "job.kind", MAX_KIND_LENGTH)
        if not kind:
            raise InvalidArgument('job.kind is required, for example "video_render"')
        request_id = _name(request.request_id, "request_id", MAX_REQUEST_ID_LENGTH) or None
        schedule = _schedule(request.job)
        async with cpu_turn():
            data = document(request.job.data, "job.data")
        job = await self._store.create(require_profile_id(), kind, data, request_id, schedule)
        return await _reply(job)

    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: ServicerContext
    ) -> jobs_pb2.Job:
        job_id = parse_job_id(request.job_id)
        lease_id = _lease_id(request.lease_id, current_caller())
        return await _reply(await self._store.get(require_profile_id(), job_id, lease_id))

    async def UpdateJob(
        self, request: jobs_pb2.UpdateJobRequest, context: ServicerContext
    ) -> jobs_pb2.Job:
        job_id = parse_job_id(request.job.job_id, "job.job_id")
        paths = at_most(request.update_mask.paths, "update_mask.paths", len(UPDATABLE_FIELDS))
        async with cpu_turn():
            changes = _changes(request.job, list(paths))
        etag = _etag(request.job.etag)
        lease_id = _lease_id(request.lease_id, current_caller())
        job = await self._store.update(require_profile_id(), job_id, changes, etag, lease_id)
        return await _reply(job)

    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: ServicerContext
    ) -> bytes:  # a ListJobsResponse, encoded (paging.encoded_page)
        return await self._list(request, all_profiles=False)

    async def ListAllJobs(
        self, request: jobs_pb2.ListJobsRequest, context: ServicerContext
    ) -> bytes:  # a ListJobsResponse, encoded
        return await self._list(request, all_profiles=True)

    async def _list(self, request: jobs_pb2.ListJobsRequest, all_profiles: bool) -> bytes:
        size = page_size(request.page_size)
        job_filter = _filter(request)
        after = None
        if request.page_token:
            after = decode_page_token(request.page_token, job_filter.as_key())
        profile_id = None if all_profiles else require_profile_id()
        jobs, more = await self._store.list(
            profile_id, job_filter, size, after, max_bytes=self._reply_bytes
        )
        response = jobs_pb2.ListJobsResponse()
        return await encoded_page(
            response,
            "jobs",
            jobs,
            more=more,
            to_message=job_message,
            position=lambda job: (job.create_time, job.job_id),
            filters=job_filter.as_key(),
            max_bytes=self._reply_bytes,
        )

    async def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: ServicerContext
    ) -> jobs_pb2.Job:
        job_id = parse_job_id(request.job_id)
        return await _reply(await self._store.cancel(require_profile_id(), job_id))

    async def DeleteJob(
        self, request: jobs_pb2.DeleteJobRequest, context: ServicerContext
    ) -> empty_pb2.Empty:
        await self._store.delete(require_profile_id(), parse_job_id(request.job_id))
        return empty_pb2.Empty()

    async def ExportProfile(
        self, request: jobs_pb2.ExportProfileRequest, context: ServicerContext
    ) -> AsyncIterator[jobs_pb2.ExportProfileResponse]:
        profile_id = require_profile_id()
        after = None
        while True:
            jobs, more = await self._store.list(
                profile_id, JobFilter(), EXPORT_PAGE_ROWS, after, max_bytes=self._reply_bytes
            )
            async with cpu_turn():
                page = jobs_pb2.ExportProfileResponse(jobs=[job_message(job) for job in jobs])
            yield page
            if not more:
                return
            after = (jobs[-1].create_time, jobs[-1].job_id)

    async def DeleteProfile(
        self, request: jobs_pb2.DeleteProfileRequest, context: ServicerContext
    ) -> jobs_pb2.DeleteProfileResponse:
        profile_id = require_profile_id()
        if request.validate_only:
            count = await self._store.count(profile_id)
            return jobs_pb2.DeleteProfileResponse(jobs=count, done=True)
        deleted, done = await delete_in_batches(
            lambda limit: self._store.delete_some(profile_id, limit)
        )
        log_deleted(f"{deleted} jobs", done)
        return jobs_pb2.DeleteProfileResponse(jobs=deleted, done=done)

    async def LeaseJobs(
        self, request: jobs_pb2.LeaseJobsRequest, context: ServicerContext
    ) -> jobs_pb2.LeaseJobsResponse:
        kinds = at_most(request.kinds, "kinds", MAX_LEASE_KINDS)
        if not kinds:
            raise InvalidArgument(
                'kinds is required: the kinds this worker runs, for example "video_render"'
            )
        kinds = sorted({_name(kind, "kinds", MAX_KIND_LENGTH) for kind in kinds})
        max_jobs = min(request.max_jobs or 1, MAX_JOBS_PER_LEASE)
        if max_jobs < 0:
            raise InvalidArgument(f"max_jobs must not be negative, got {request.max_jobs}")
        lease_seconds = _lease_seconds(request.lease_duration)
        caller = current_caller()
        subject = caller.subject if caller is not None else "anonymous"
        worker = _name(request.worker, "worker", MAX_WORKER_LENGTH) or subject
        wait = _wait_seconds(request.wait)
        share = f"(worker {subject})"
        until = time.monotonic() + wait
        while True:
            jobs = await self._store.lease(
                share,
                worker,
                kinds,
                max_jobs,
                lease_seconds,
                self._max_processing,
                # One more job at its largest still fits in the reply.
                max(self._reply_bytes - LARGEST_JOB_BYTES, 0),
            )
            left = until - time.monotonic()
            if jobs or left <= 0:
                break
            await self._watch_hub.work_arrived(within=min(left, LEASE_RECHECK_SECONDS))
        async with cpu_turn():
            return jobs_pb2.LeaseJobsResponse(jobs=[job_message(job) for job in jobs])

    async def GetQueueStats(
        self, request: jobs_pb2.GetQueueStatsRequest, context: ServicerContext
    ) -> jobs_pb2.QueueStats:
        limit = min(request.limit or DEFAULT_QUEUE_STATS, MAX_QUEUE_STATS)
        if limit < 0:
            raise InvalidArgument(f"limit must not be negative, got {request.limit}")
        within = _seconds(request.expiring_within)
        if within < 0:
            raise InvalidArgument(f"expiring_within must not be negative, got {within:g}s")
        within = min(within or DEFAULT_EXPIRING_WITHIN_SECONDS, MAX_EXPIRING_WITHIN_SECONDS)
        queues, leases = await self._store.queue_stats(limit, within)
        stats = jobs_pb2.QueueStats()
        for queue in queues:
            entry = stats.queues.add(
                kind=queue.kind,
                profile_id=queue.profile_id,
                pending=queue.pending,
                ready=queue.ready,
                leased=queue.leased,
            )
            if queue.oldest_pending_create_time is not None:
                entry.oldest_pending_create_time.CopyFrom(
                    timestamp_message(queue.oldest_pending_create_time)
                )
        for lease in leases:
            stats.expiring_leases.add(
                job_id=str(lease.job_id),
                profile_id=lease.profile_id,
                kind=lease.kind,
                worker=lease.worker,
                expire_time=timestamp_message(lease.expire_time),
                attempt=lease.attempt,
            )
        return stats

    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: ServicerContext
    ) -> AsyncIterator[jobs_pb2.Job]:
        # Closed here, not when collected, so that the watcher is released when the call ends.
        watched = self._watch_hub.watch(require_profile_id(), parse_job_id(request.job_id))
        async with contextlib.aclosing(watched) as jobs:
            async for job in jobs:
                yield job
