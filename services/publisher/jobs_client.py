"""The Jobs service as PublishJob sees it: read a job, write its result back.

Calls carry the current profile, the caller's token and what is left of the caller's deadline
(the channel comes from runtime.channels), so the Jobs service answers for the same profile
and caller only.
"""

from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import field_mask_pb2, json_format
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from services.runtime.errors import (
    Conflict,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

# The caller's own deadline, passed on by the interceptor, shortens this.
CALL_TIMEOUT_SECONDS = 30.0

_ERRORS: dict[grpc.StatusCode, type[DomainError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Conflict,
}


@dataclass(frozen=True, slots=True)
class JobSnapshot:
    job_id: str
    status: str
    result: dict[str, Any]
    etag: str


def _snapshot(job: jobs_pb2.Job) -> JobSnapshot:
    return JobSnapshot(
        job_id=job.job_id,
        status=jobs_pb2.JobStatus.Name(job.status),
        result=json_format.MessageToDict(job.result),
        etag=job.etag,
    )


def _domain_error(error: grpc.aio.AioRpcError) -> DomainError:
    error_type = _ERRORS.get(error.code(), Unavailable)
    return error_type(f"the Jobs service answered {error.code().name}: {error.details()}")


class JobsClient:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._stub = jobs_pb2_grpc.JobServiceStub(self._channel)

    async def aclose(self) -> None:
        await self._channel.close()

    async def get_job(self, job_id: str) -> JobSnapshot:
        try:
            job = await self._stub.GetJob(
                jobs_pb2.GetJobRequest(job_id=job_id), timeout=CALL_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as error:
            raise _domain_error(error) from None
        return _snapshot(job)

    async def write_result(self, job_id: str, result: dict[str, Any], etag: str) -> JobSnapshot:
        """Replaces the job's result; Conflict when the job changed since `etag`."""
        job = jobs_pb2.Job(job_id=job_id, etag=etag)
        job.result.update(result)
        request = jobs_pb2.UpdateJobRequest(
            job=job, update_mask=field_mask_pb2.FieldMask(paths=["result"])
        )
        try:
            updated = await self._stub.UpdateJob(request, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            raise _domain_error(error) from None
        return _snapshot(updated)
