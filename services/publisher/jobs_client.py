"""The Jobs service as PublishJob sees it: read a job, write its result back.

Calls go through a channel of the suite's typed client: they carry the current profile, the
caller's token and what is left of the caller's deadline, retry UNAVAILABLE, and fail with
suite_client's exceptions, which are the runtime's domain errors (a job of another profile
stays NOT_FOUND for our caller).
"""

from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import field_mask_pb2, json_format

import suite_client
from suite_client import jobs_pb2


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


class JobsClient:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._stub = suite_client.JobServiceStub(channel)

    async def aclose(self) -> None:
        await self._channel.close()

    async def get_job(self, job_id: str) -> JobSnapshot:
        return _snapshot(await self._stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id)))

    async def write_result(self, job_id: str, result: dict[str, Any], etag: str) -> JobSnapshot:
        """Replaces the job's result; Conflict when the job changed since `etag`."""
        job = jobs_pb2.Job(job_id=job_id, etag=etag)
        job.result.update(result)
        request = jobs_pb2.UpdateJobRequest(
            job=job, update_mask=field_mask_pb2.FieldMask(paths=["result"])
        )
        return _snapshot(await self._stub.UpdateJob(request))
