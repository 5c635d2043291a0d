"""The Costs service as the shared runtime starts it."""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
from costs.v1 import costs_pb2_grpc

import suite_client
from services.costs.leases import LeaseCheck
from services.costs.model import read_catalog
from services.costs.recorder import Recorder
from services.costs.servicer import CostServicer
from services.costs.spool import Spool
from services.costs.store import CostStore, load_catalog
from services.runtime.database import TenantScopedPool
from services.runtime.interceptors.handlers import InterceptedHandlers
from services.runtime.paging import reply_budget
from services.runtime.server import ServiceDefinition, ServicersFactory
from services.runtime.settings import Settings

PRICE_CATALOG = Path(__file__).parent / "prices.csv"
DEFAULT_SPOOL_PATH = Path(".data/costs/spool.jsonl")
DEFAULT_JOBS_TARGET = "localhost:50051"
DEFAULT_SPOOL_RETRY_SECONDS = 5.0
# Half of the Kubernetes manifests' 1 GiB claim: room left for the dead-letter file.
DEFAULT_SPOOL_MAX_BYTES = 512 * 1024 * 1024


async def load_price_catalog(connection: asyncpg.Connection) -> None:
    await load_catalog(connection, read_catalog(PRICE_CATALOG))


def costs_servicers(spool: Spool, spool_retry_seconds: float, jobs_target: str) -> ServicersFactory:
    @asynccontextmanager
    async def servicers(
        handlers: InterceptedHandlers, pool: TenantScopedPool, settings: Settings
    ) -> AsyncIterator[None]:
        store = CostStore(pool)
        recorder = Recorder(store, spool, spool_retry_seconds)
        await recorder.start()
        # A worker's usage is recorded once Jobs says the worker holds the job's lease: over
        # TLS when GRPC_TLS_SERVER_CA is set, as the Publisher calls Jobs.
        tls = suite_client.tls_credentials(
            settings.tls_server_ca, settings.tls_cert, settings.tls_key
        )
        leases = LeaseCheck(suite_client.jobs_channel(jobs_target, tls=tls))
        servicer = CostServicer(store, recorder, reply_budget(settings.max_message_bytes), leases)
        costs_pb2_grpc.add_CostServiceServicer_to_server(servicer, handlers)
        try:
            yield
        finally:
            await recorder.close()
            await leases.aclose()

    return servicers


def _positive_number(name: str, default: float) -> float:
    raw = os.environ.get(name) or default
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise SystemExit(f"{name} must be a number above 0, got {raw!r}")
    return value


def costs_definition(
    spool_path: Path | None = None,
    spool_retry_seconds: float | None = None,
    spool_max_bytes: int | None = None,
    jobs_target: str | None = None,
) -> ServiceDefinition:
    """The service; the spool settings default to COSTS_SPOOL_PATH, COSTS_SPOOL_RETRY_SECONDS
    and COSTS_SPOOL_MAX_BYTES, the Jobs service (asked about workers' leases) to JOBS_TARGET."""
    if spool_path is None:
        spool_path = Path(os.environ.get("COSTS_SPOOL_PATH") or DEFAULT_SPOOL_PATH)
    if spool_retry_seconds is None:
        spool_retry_seconds = _positive_number(
            "COSTS_SPOOL_RETRY_SECONDS", DEFAULT_SPOOL_RETRY_SECONDS
        )
    if spool_max_bytes is None:
        spool_max_bytes = int(_positive_number("COSTS_SPOOL_MAX_BYTES", DEFAULT_SPOOL_MAX_BYTES))
    spool = Spool(spool_path, spool_max_bytes)
    jobs_target = jobs_target or os.environ.get("JOBS_TARGET") or DEFAULT_JOBS_TARGET
    return ServiceDefinition(
        name="costs",
        grpc_service="costs.v1.CostService",
        default_port=50052,
        migrations=Path(__file__).parent / "migrations",
        servicers=costs_servicers(spool, spool_retry_seconds, jobs_target),
        cross_profile_reads=("GetAllProfilesCostSummary",),
        worker_updates=("RecordElevenLabsTTS", "RecordGeminiUsage", "RecordUsage"),
        reference_data=load_price_catalog,
        # Record calls are spooled while the database is down: callers should keep coming.
        accepts_writes_without_database=spool.accepts_lines,
    )
