"""Server start-up and shutdown, the same for every service.

A service contributes a ServiceDefinition; this module adds what every gRPC service of the
suite has: the profile interceptor with the authorizer AUTH_MODE names and each profile's fair
share of the replica, optional TLS, health (NOT_SERVING while the database is unreachable,
unless the service still takes writes), reflection for grpcurl, message-size, keepalive and
concurrency limits, migrations at start-up, and a graceful shutdown on SIGTERM or SIGINT in a
fixed order.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import asyncpg
import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from services.runtime import page_tokens
from services.runtime.auth import authorizer_for
from services.runtime.byte_rates import ProfileByteRates
from services.runtime.call_rates import ProfileCallRates
from services.runtime.database import CONNECTION_ERRORS, TenantScopedPool, create_pool
from services.runtime.interceptors.handlers import (
    InterceptedHandlers,
    InterceptorChain,
    WrappingInterceptor,
)
from services.runtime.interceptors.server import (
    ACCESS_LOG_FAILURES,
    Authorizer,
    ProfileInterceptor,
)
from services.runtime.logs import configure_logging
from services.runtime.metrics import POOLS, MetricsServer, serve_metrics
from services.runtime.migrations import apply_migrations
from services.runtime.settings import Settings
from services.runtime.shares import ProfileShares
from services.runtime.tracing import (
    configure_tracing,
    inner_server_interceptors,
    outer_server_interceptors,
    tracing_enabled,
)
from services.runtime.workers import run_workers

log = logging.getLogger(__name__)

# Ends a service's long-lived streams (WatchJob) when shutdown starts.
EndStreams = Callable[[], Awaitable[None]]

# Registers the service's handlers on the InterceptedHandlers given, as generated
# `add_*Servicer_to_server` functions do on a server.
ServicersFactory = Callable[
    [InterceptedHandlers, TenantScopedPool, Settings],
    AbstractAsyncContextManager[EndStreams | None],
]


@dataclass(frozen=True)
class ServiceDefinition:
    """What one service brings; everything else is shared."""

    name: str  # also its Postgres schema
    grpc_service: str  # full name, for example "jobs.v1.JobService"
    default_port: int
    migrations: Path
    # Registers the servicers on enter and yields what ends their long-lived streams, if they
    # have any; releases what they hold (listeners, clients) on exit, once no call is left.
    servicers: ServicersFactory
    # Loads reference data kept in the repo (Costs' price catalog) after the SQL migrations,
    # as the schema owner: the service's own role may only read it.
    reference_data: Callable[[asyncpg.Connection], Awaitable[None]] | None = None
    # RPC names that read across profiles: operator scope only, no x-profile-id.
    cross_profile_reads: tuple[str, ...] = ()
    # RPC names of the work queue: those that lease across profiles (worker scope only, no
    # x-profile-id), and those a worker may call for the profile of a job it holds.
    worker_leases: tuple[str, ...] = ()
    worker_updates: tuple[str, ...] = ()
    # RPC names an operator calls for one profile (x-profile-id): operator scope only, each
    # call logged with who made it.
    profile_lifecycle: tuple[str, ...] = ("ExportProfile", "DeleteProfile")
    # True while the service still takes writes with its database unreachable (Costs, while
    # its spool has room): its health then stays SERVING, so callers keep sending them.
    accepts_writes_without_database: Callable[[], bool] = lambda: False

    @property
    def database_role(self) -> str:
        """The role queries run as: no ownership, no BYPASSRLS (made by the migrations)."""
        return f"{self.name}_service"

    def _methods(self, *names: tuple[str, ...]) -> frozenset[str]:
        return frozenset(f"/{self.grpc_service}/{name}" for group in names for name in group)

    @property
    def cross_profile_methods(self) -> frozenset[str]:
        return self._methods(self.cross_profile_reads, self.worker_leases)

    @property
    def worker_methods(self) -> frozenset[str]:
        return self._methods(self.worker_leases, self.worker_updates)

    @property
    def operator_methods(self) -> frozenset[str]:
        return self._methods(self.profile_lifecycle)

    @property
    def default_metrics_port(self) -> int:
        """9091, 9092, 9093 for gRPC ports 50051, 50052, 50053: one machine runs them all."""
        return self.default_port - 50051 + 9091


class ProfileLimits(NamedTuple):
    """Each profile's share of a replica (see the README's fair shares)."""

    calls: ProfileShares  # calls in flight
    streams: ProfileShares  # response streams open
    byte_rates: ProfileByteRates  # bytes a second in requests and replies
    call_rates: ProfileCallRates  # calls a second


def profile_shares(settings: Settings) -> ProfileLimits:
    """Each profile's share of a replica, as the settings give it."""
    return ProfileLimits(
        ProfileShares(settings.profile_max_calls_in_flight, settings.profile_queue_seconds),
        ProfileShares(settings.profile_max_streams, what="streams open"),
        ProfileByteRates(
            settings.profile_bytes_per_second,
            settings.profile_bytes_burst,
            settings.profile_queue_seconds,
        ),
        ProfileCallRates(
            settings.profile_calls_per_second,
            settings.profile_calls_burst,
            settings.profile_queue_seconds,
        ),
    )


def suite_interceptor(
    authorize: Authorizer,
    cross_profile_methods: frozenset[str] = frozenset(),
    access_log: str = ACCESS_LOG_FAILURES,
    shares: ProfileLimits | None = None,
    worker_methods: frozenset[str] = frozenset(),
    traced: bool = False,
    operator_methods: frozenset[str] = frozenset(),
) -> InterceptorChain:
    """The suite's work around every handler, outermost first; `shares` as profile_shares
    makes them (no limits without)."""
    return InterceptorChain(
        ProfileInterceptor(
            authorize,
            cross_profile_methods,
            access_log,
            worker_methods=worker_methods,
            operator_methods=operator_methods,
            **(shares._asdict() if shares else {}),
        ),
        *inner_server_interceptors(traced),
    )


def new_server(
    interceptor: WrappingInterceptor,
    options: list[tuple[str, int]] | None = None,
    maximum_concurrent_rpcs: int | None = None,
    traced: bool = False,
) -> tuple[grpc.aio.Server, InterceptedHandlers]:
    """A grpc.aio server and the registry its services register their handlers on; the
    suite's interceptor wraps each handler there, once. Only the tracing interceptor (when
    tracing is on) runs as a grpc.aio interceptor, so that refused calls are traced too.

    Beyond `maximum_concurrent_rpcs` calls in flight, grpc.aio refuses a call before any
    handler or interceptor runs: RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded!"."""
    handlers = InterceptedHandlers(interceptor)
    server = grpc.aio.server(
        interceptors=outer_server_interceptors(traced),
        options=options,
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
    )
    server.add_generic_rpc_handlers([handlers])
    return server, handlers


def server_options(settings: Settings) -> list[tuple[str, int]]:
    # Streams beyond the limit wait in the client for one of the connection's streams to end.
    streams = [("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams)]
    return [
        *(streams if settings.grpc_max_concurrent_streams else []),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # Clients reconnect, and so re-resolve and spread over new replicas after a scale-up.
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.shutdown_grace_seconds * 1000)),
        # Several worker processes share one port only when asked to (GRPC_WORKERS > 1);
        # otherwise a second server on a taken port fails loudly instead of splitting traffic.
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
    ]


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS for the gRPC port when a certificate is set; mutual TLS when a client CA is too."""
    if not settings.tls_cert:
        return None
    client_ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


async def connect(settings: Settings, application_name: str) -> asyncpg.Pool:
    """The pool, retried with backoff while the database is not up yet."""
    give_up_at = time.monotonic() + settings.db_connect_timeout_seconds
    delay = 0.2
    while True:
        try:
            return await create_pool(
                settings.database_url,
                min_size=settings.db_pool_min_size,
                max_size=settings.db_pool_max_size,
                application_name=application_name,
                transaction_pooler=settings.db_transaction_pooler,
            )
        except CONNECTION_ERRORS as error:
            if time.monotonic() + delay > give_up_at:
                raise SystemExit(f"cannot reach the database: {error}") from error
            log.warning("database not reachable yet (%s); retrying in %.1fs", error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def migrate(definition: ServiceDefinition, connection: asyncpg.Connection) -> list[int]:
    """The service's pending SQL migrations, then its reference data; the versions applied."""
    applied = await apply_migrations(connection, definition.name, definition.migrations)
    if definition.reference_data is not None:
        await definition.reference_data(connection)
    return applied


class RunningService:
    """A started service; `port` is the bound port (useful when asked for port 0)."""

    def __init__(
        self,
        definition: ServiceDefinition,
        settings: Settings,
        server: grpc.aio.Server,
        pool: TenantScopedPool,
        health_servicer: health.aio.HealthServicer,
        resources: AsyncExitStack,
        end_streams: EndStreams | None,
        port: int,
        metrics: MetricsServer | None = None,
    ) -> None:
        self.definition = definition
        self.settings = settings
        self.server = server
        self.pool = pool
        self.health = health_servicer
        self.port = port
        self.metrics = metrics
        self._resources = resources
        self._end_streams = end_streams
        self._monitor = asyncio.create_task(self._watch_database())

    async def _set_serving(self, serving: bool) -> None:
        """The service's own health follows the database, or whether the service can take
        writes without it (readiness); the server's overall health ("", liveness) stays
        SERVING until shutdown, so an outage of the database takes replicas out of rotation
        without getting them restarted."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(self.definition.grpc_service, status)

    async def _watch_database(self) -> None:
        reachable = serving = True
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._set_serving(serving)
        while True:
            await asyncio.sleep(self.settings.health_check_interval_seconds)
            now_reachable = await self.pool.is_reachable()
            if now_reachable != reachable:
                reachable = now_reachable
                log.warning("database %s", "reachable again" if reachable else "unreachable")
            now_serving = reachable or self.definition.accepts_writes_without_database()
            if now_serving != serving:
                serving = now_serving
                await self._set_serving(serving)

    async def stop(self, grace: float | None = None) -> None:
        """Shuts down in this order:

        1. health NOT_SERVING, and still serve for the drain period;
        2. refuse new calls, and end long-lived streams (WatchJob), which would otherwise
           hold the whole grace period;
        3. let in-flight calls finish, within the grace; those still running then are
           cancelled;
        4. only then release the service's resources (HTTP clients, channels to other
           services, listeners), so that no call loses them half-way: a CreatePost that
           posted still records it;
        5. close the pool.
        """
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        self._monitor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._monitor
        await self.health.enter_graceful_shutdown()
        # A call arriving as the server stops can be cancelled unserved; clients that watch
        # health have left by the end of the drain, so none arrive then.
        await asyncio.sleep(self.settings.shutdown_drain_seconds)
        stopping = asyncio.create_task(self.server.stop(grace))
        if self._end_streams is not None:
            await self._end_streams()
        await stopping
        await self._resources.aclose()
        POOLS.remove(self.pool)
        await self.pool.close()
        if self.metrics is not None:
            self.metrics.stop()
        log.info("%s stopped", self.definition.name)


async def start_service(
    definition: ServiceDefinition,
    settings: Settings,
    authorize: Authorizer | None = None,
) -> RunningService:
    """Connects, migrates (unless disabled), registers everything and starts serving.

    `authorize` defaults to the authorizer settings.auth_mode names."""
    traced = settings.trace_calls and tracing_enabled()
    raw_pool = await connect(settings, application_name=definition.name)
    if settings.migrate_on_start:
        async with raw_pool.acquire() as connection:
            await migrate(definition, connection)
    pool = TenantScopedPool(
        raw_pool,
        definition.database_role,
        service=definition.name,
        acquire_timeout_seconds=settings.db_acquire_timeout_seconds,
        statement_timeout_seconds=settings.db_statement_timeout_seconds,
        connections_per_profile=settings.db_connections_per_profile,
        traced=traced,
    )
    if settings.page_token_key:
        page_tokens.use_key(settings.page_token_key.encode())
    interceptor = suite_interceptor(
        authorize or authorizer_for(settings),
        definition.cross_profile_methods,
        settings.access_log,
        profile_shares(settings),
        definition.worker_methods,
        traced,
        definition.operator_methods,
    )
    server, handlers = new_server(
        interceptor, server_options(settings), settings.grpc_max_concurrent_rpcs or None, traced
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, handlers)
    resources = AsyncExitStack()
    end_streams = await resources.enter_async_context(
        definition.servicers(handlers, pool, settings)
    )
    served = [definition.grpc_service, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer(served), handlers
    )
    address = f"{settings.host}:{settings.port}"
    credentials = server_credentials(settings)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    POOLS.add(definition.name, pool)
    metrics = None
    if settings.metrics_port is not None:
        metrics = serve_metrics(settings.host, settings.metrics_port)
    await server.start()
    log.info(
        "%s serving %s on %s:%d (auth %s%s)",
        definition.name,
        definition.grpc_service,
        settings.host,
        port,
        settings.auth_mode,
        ", mutual TLS" if settings.tls_client_ca else ", TLS" if settings.tls_cert else "",
    )
    return RunningService(
        definition, settings, server, pool, health_servicer, resources, end_streams, port, metrics
    )


# Young collections every 20,000 container allocations rather than Python's 700: a page of
# jobs allocates hundreds of thousands, and every collection holds the event loop.
GC_THRESHOLDS = (20_000, 50, 100)


def settle_garbage_collector() -> None:
    """Once started: what start-up made lives as long as the process, so the collector stops
    walking it (gc.freeze), and collects the young less often. A full collection walked every
    module, and held the loop for 60 ms in the noisy-neighbour tests; frozen, it walks only what
    calls made."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(definition: ServiceDefinition, settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    service = await start_service(definition, settings)
    settle_garbage_collector()
    await stop.wait()
    log.info("shutting down; in-flight calls have %.1fs", settings.shutdown_grace_seconds)
    await service.stop()


async def migrate_only(definition: ServiceDefinition, settings: Settings) -> None:
    pool = await connect(settings, application_name=f"{definition.name}-migrate")
    try:
        async with pool.acquire() as connection:
            applied = await migrate(definition, connection)
        log.info("%s: %d migration(s) applied", definition.name, len(applied))
    finally:
        await pool.close()


def main_for(definition: ServiceDefinition) -> None:
    """The command line of `python -m services.<name>`: serve, or `migrate` and exit."""
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{definition.name}",
        description=f"The {definition.grpc_service} gRPC server. "
        "Configuration comes from environment variables (see the README).",
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=["serve", "migrate"],
        default="serve",
        help="serve (default) or apply the database migrations and exit",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="server processes sharing the port (SO_REUSEPORT); default GRPC_WORKERS or 1",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure_logging(service=definition.name)
    configure_tracing(definition.name)
    settings = Settings.from_environment(definition.default_port, definition.default_metrics_port)
    if args.workers is not None:
        settings = dataclasses.replace(settings, workers=args.workers)
    if args.command == "migrate":
        uvloop.run(migrate_only(definition, settings))
    elif settings.workers > 1 and not args.worker:
        sys.exit(uvloop.run(run_workers(definition.name, settings)))
    else:
        # uvloop: its sockets and timers cost asyncpg and gRPC less CPU per call than
        # asyncio's own loop (`make bench`).
        uvloop.run(serve(definition, settings))
