"""The Jobs service as the shared runtime starts it."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from jobs.v1 import jobs_pb2_grpc

from services.jobs.servicer import JobServicer
from services.jobs.store import JobStore
from services.jobs.watch import JobWatchHub
from services.runtime.database import TenantScopedPool
from services.runtime.interceptors.handlers import InterceptedHandlers
from services.runtime.paging import reply_budget
from services.runtime.server import ServiceDefinition
from services.runtime.settings import Settings


@asynccontextmanager
async def _servicers(
    handlers: InterceptedHandlers, pool: TenantScopedPool, settings: Settings
) -> AsyncIterator[None]:
    store = JobStore(pool)
    watch_hub = JobWatchHub(settings.database_url, store)
    await watch_hub.start()
    jobs_pb2_grpc.add_JobServiceServicer_to_server(
        JobServicer(store, watch_hub, reply_budget(settings.max_message_bytes)), handlers
    )
    try:
        yield
    finally:
        await watch_hub.close()


JOBS = ServiceDefinition(
    name="jobs",
    grpc_service="jobs.v1.JobService",
    default_port=50051,
    migrations=Path(__file__).parent / "migrations",
    servicers=_servicers,
    cross_profile_reads=("ListAllJobs",),
)
