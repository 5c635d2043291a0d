"""Whether a pipeline worker may record usage for a job: it holds, or held, a lease on it.

A worker's token (scope "worker") names no profile; it acts for a profile only on the jobs
LeaseJobs gave it. The Jobs service is the one that knows: Costs asks it for the job under
the worker's lease (GetJob with lease_id, on the worker's own token, which the call carries
on), and keeps each answer that says yes: a lease once granted on a job stays granted, so
usage metered during a lease is still recorded after the job has finished, or when a
worker's outbox sends it late.
"""

import uuid
from collections import OrderedDict

import grpc

import suite_client
from services.runtime.errors import PermissionDenied
from suite_client import jobs_pb2

# Leases known to be granted, (profile, job, lease), the most recently used kept.
KNOWN_LEASES = 10_000


class LeaseCheck:
    def __init__(self, jobs_channel: grpc.aio.Channel) -> None:
        self._channel = jobs_channel
        self._jobs = suite_client.JobServiceStub(jobs_channel)
        self._known: OrderedDict[tuple[str, uuid.UUID, str], None] = OrderedDict()

    async def aclose(self) -> None:
        await self._channel.close()

    async def require(self, profile_id: str, job_id: uuid.UUID | None, lease_id: str) -> None:
        """Returns when the worker making the call was given `lease_id` on the profile's job;
        PermissionDenied otherwise, Unavailable while Jobs cannot say."""
        if job_id is None or not lease_id:
            raise PermissionDenied(
                "a worker token records usage only for a job it holds: set job_id and the "
                "lease_id LeaseJobs gave on it"
            )
        key = (profile_id, job_id, lease_id)
        if key in self._known:
            self._known.move_to_end(key)
            return
        try:
            # On the worker's own token and for the call's profile (suite_client's channel
            # carries both on), bounded by what is left of the call's deadline.
            await self._jobs.GetJob(jobs_pb2.GetJobRequest(job_id=str(job_id), lease_id=lease_id))
        except (suite_client.NotFound, suite_client.InvalidArgument):
            raise PermissionDenied(
                f"this worker was never given lease {lease_id[:64]} on job {job_id}"
            ) from None
        self._known[key] = None
        if len(self._known) > KNOWN_LEASES:
            self._known.popitem(last=False)
