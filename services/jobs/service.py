"""The Jobs service as the shared runtime starts it."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from jobs.v1 import jobs_pb2_grpc

from services.jobs.leasing import LeasePolicy, lease_sweeper
from services.jobs.retention import RetentionPolicy, retention_sweeper
from services.jobs.servicer import JobServicer, job_message
from services.jobs.store import JobStore
from services.jobs.watch import JobWatchHub, WatchLimits
from services.runtime.database import TenantScopedPool
from services.runtime.interceptors.handlers import InterceptedHandlers
from services.runtime.paging import reply_budget
from services.runtime.server import EndStreams, ServiceDefinition, ServicersFactory
from services.runtime.settings import Settings, env_int


def watch_limits_from_environment() -> WatchLimits:
    """JOBS_WATCHERS_PER_PROFILE and JOBS_WATCHERS_PER_REPLICA, or the defaults."""
    return WatchLimits(
        per_profile=env_int("JOBS_WATCHERS_PER_PROFILE", WatchLimits.per_profile),
        per_replica=env_int("JOBS_WATCHERS_PER_REPLICA", WatchLimits.per_replica),
    )


def jobs_servicers(
    watch_limits: WatchLimits | None,
    lease_policy: LeasePolicy | None,
    retention_policy: RetentionPolicy | None,
) -> ServicersFactory:
    @asynccontextmanager
    async def servicers(
        handlers: InterceptedHandlers, pool: TenantScopedPool, settings: Settings
    ) -> AsyncIterator[EndStreams]:
        store = JobStore(pool)
        limits = watch_limits or watch_limits_from_environment()
        # LISTEN needs a session: past a transaction pooler, a direct connection.
        listen_url = settings.database_listen_url or settings.database_url
        watch_hub = JobWatchHub(listen_url, store, job_message, limits)
        await watch_hub.start()
        policy = lease_policy or LeasePolicy.from_environment()
        retention = retention_policy or RetentionPolicy.from_environment()
        sweepers = [lease_sweeper(store, policy), retention_sweeper(store, retention)]
        sweepers = [sweeper for sweeper in sweepers if sweeper is not None]
        for sweeper in sweepers:
            sweeper.start()
        servicer = JobServicer(
            store,
            watch_hub,
            reply_budget(settings.max_message_bytes),
            policy.max_processing_per_profile,
        )
        jobs_pb2_grpc.add_JobServiceServicer_to_server(servicer, handlers)
        try:
            # WatchJob streams end as shutdown starts; the hub closes again, harmlessly, on exit.
            yield watch_hub.close
        finally:
            for sweeper in sweepers:
                await sweeper.close()
            await watch_hub.close()

    return servicers


def jobs_definition(
    watch_limits: WatchLimits | None = None,
    lease_policy: LeasePolicy | None = None,
    retention_policy: RetentionPolicy | None = None,
) -> ServiceDefinition:
    """The service; the watch limits, lease and retention policies default to the
    environment's, read at start."""
    return ServiceDefinition(
        name="jobs",
        grpc_service="jobs.v1.JobService",
        default_port=50051,
        migrations=Path(__file__).parent / "migrations",
        servicers=jobs_servicers(watch_limits, lease_policy, retention_policy),
        cross_profile_reads=("ListAllJobs", "GetQueueStats"),
        worker_leases=("LeaseJobs",),
        worker_updates=("UpdateJob", "GetJob"),
    )


JOBS = jobs_definition()
