"""A typed client for the suite's gRPC services.

    import suite_client
    from suite_client import jobs_pb2

    async with suite_client.jobs_channel("dns:///jobs:50051") as channel:
        jobs = suite_client.JobServiceStub(channel)
        with suite_client.profile_scope("store-1"):
            job = await jobs.CreateJob(jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="render")))
        try:
            await jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id),
                              metadata=suite_client.profile_metadata("store-2"))
        except suite_client.NotFound:
            ...  # another profile's job is not found

Channels balance over every replica (round_robin), retry UNAVAILABLE, and give every call a
deadline (30 s unless the call sets its own). Inside a call being served, the profile and
what is left of the deadline are passed on by themselves.

Workers meter the AI calls they pay for with `Metering` (suite_client.metering): usage is
recorded with the Costs service on the worker's token, through a durable local outbox.
"""

from costs.v1 import costs_pb2
from costs.v1.costs_pb2_grpc import CostServiceStub
from jobs.v1 import jobs_pb2
from jobs.v1.jobs_pb2_grpc import JobServiceStub
from publisher.v1 import publisher_pb2
from publisher.v1.publisher_pb2_grpc import PublisherServiceStub

from services.runtime.call_context import PROFILE_METADATA_KEY, profile_scope
from suite_client.channels import (
    COSTS_SERVICE,
    DEFAULT_DEADLINE_SECONDS,
    JOBS_SERVICE,
    PUBLISHER_SERVICE,
    RetryPolicy,
    costs_channel,
    jobs_channel,
    publisher_channel,
    suite_channel,
    tls_credentials,
)
from suite_client.errors import (
    Conflict,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SuiteError,
    Unauthenticated,
    Unavailable,
    error_from,
)
from suite_client.metering import Metering, UsageRefused
from suite_client.usage_outbox import OutboxFull, OutboxInUse


def profile_metadata(profile_id: str) -> tuple[tuple[str, str], ...]:
    """Metadata for one call made for `profile_id` (outside a profile_scope)."""
    return ((PROFILE_METADATA_KEY, profile_id),)


__all__ = [
    "COSTS_SERVICE",
    "DEFAULT_DEADLINE_SECONDS",
    "JOBS_SERVICE",
    "PUBLISHER_SERVICE",
    "Conflict",
    "CostServiceStub",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "JobServiceStub",
    "Metering",
    "NotFound",
    "OutboxFull",
    "OutboxInUse",
    "PermissionDenied",
    "PublisherServiceStub",
    "ResourceExhausted",
    "RetryPolicy",
    "SuiteError",
    "Unauthenticated",
    "Unavailable",
    "UsageRefused",
    "costs_channel",
    "costs_pb2",
    "error_from",
    "jobs_channel",
    "jobs_pb2",
    "profile_metadata",
    "profile_scope",
    "publisher_channel",
    "publisher_pb2",
    "suite_channel",
    "tls_credentials",
]
