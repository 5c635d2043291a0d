"""jobs.v1.JobService: validates requests and converts between messages and the model."""

import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import datetime

from google.protobuf import empty_pb2, struct_pb2
from grpc.aio import ServicerContext
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from services.jobs.model import (
    UPDATABLE_FIELDS,
    Document,
    Job,
    JobChanges,
    JobFilter,
    JobStatus,
)
from services.jobs.store import JobStore
from services.jobs.watch import JobWatchHub
from services.runtime.call_context import require_profile_id
from services.runtime.errors import InvalidArgument
from services.runtime.fields import (
    at_most,
    struct_dict,
    struct_message,
    text,
    timestamp_datetime,
    timestamp_message,
)
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
    )
    _fill(message.data, job.data)
    _fill(message.result, job.result)
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
        self, store: JobStore, watch_hub: JobWatchHub[jobs_pb2.Job], reply_bytes: int
    ) -> None:
        """`reply_bytes`: the most a list reply's rows may take (paging.reply_budget)."""
        self._store = store
        self._watch_hub = watch_hub
        self._reply_bytes = reply_bytes

    async def CreateJob(
        self, request: jobs_pb2.CreateJobRequest, context: ServicerContext
    ) -> jobs_pb2.Job:
        kind = _name(request.job.kind.strip(), "job.kind", MAX_KIND_LENGTH)
        if not kind:
            raise InvalidArgument('job.kind is required, for example "video_render"')
        request_id = _name(request.request_id, "request_id", MAX_REQUEST_ID_LENGTH) or None
        async with cpu_turn():
            data = document(request.job.data, "job.data")
        return await _reply(await self._store.create(require_profile_id(), kind, data, request_id))

    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: ServicerContext
    ) -> jobs_pb2.Job:
        job_id = parse_job_id(request.job_id)
        return await _reply(await self._store.get(require_profile_id(), job_id))

    async def UpdateJob(
        self, request: jobs_pb2.UpdateJobRequest, context: ServicerContext
    ) -> jobs_pb2.Job:
        job_id = parse_job_id(request.job.job_id, "job.job_id")
        paths = at_most(request.update_mask.paths, "update_mask.paths", len(UPDATABLE_FIELDS))
        async with cpu_turn():
            changes = _changes(request.job, list(paths))
        etag = _etag(request.job.etag)
        return await _reply(await self._store.update(require_profile_id(), job_id, changes, etag))

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

    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: ServicerContext
    ) -> AsyncIterator[jobs_pb2.Job]:
        # Closed here, not when collected, so that the watcher is released when the call ends.
        watched = self._watch_hub.watch(require_profile_id(), parse_job_id(request.job_id))
        async with contextlib.aclosing(watched) as jobs:
            async for job in jobs:
                yield job
