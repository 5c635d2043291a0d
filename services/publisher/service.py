"""The Publisher service as the shared runtime starts it."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from publisher.v1 import publisher_pb2_grpc

import suite_client
from services.publisher.egress import EgressPolicy
from services.publisher.jobs_client import JobsClient
from services.publisher.postiz import PostizClient
from services.publisher.publishing import Publisher
from services.publisher.servicer import PublisherServicer
from services.publisher.settings import PublisherSettings
from services.publisher.store import PostingPolicy, PublisherStore
from services.runtime.database import TenantScopedPool
from services.runtime.interceptors.handlers import InterceptedHandlers
from services.runtime.paging import reply_budget
from services.runtime.server import ServiceDefinition
from services.runtime.settings import Settings

# An attempt's record is committed before its POST starts, and the POST is over within the
# Postiz timeout; the margin covers the scheduling in between.
IN_FLIGHT_MARGIN_SECONDS = 5.0


def publisher_definition(config: PublisherSettings | None = None) -> ServiceDefinition:
    """The service; its own settings come from `config`, or from the environment at start."""

    @asynccontextmanager
    async def servicers(
        handlers: InterceptedHandlers, pool: TenantScopedPool, settings: Settings
    ) -> AsyncIterator[None]:
        own = config or PublisherSettings.from_environment()
        egress = EgressPolicy(own.postiz_trusted_hosts, own.postiz_allowed_hosts)
        postiz = PostizClient(
            egress,
            own.postiz_limits,
            get_attempts=own.postiz_get_attempts,
            retry_base_seconds=own.postiz_retry_base_seconds,
        )
        # TLS when GRPC_TLS_SERVER_CA is set, with the service's own certificate for mutual TLS.
        tls = suite_client.tls_credentials(
            settings.tls_server_ca, settings.tls_cert, settings.tls_key
        )
        jobs = JobsClient(suite_client.jobs_channel(own.jobs_target, tls=tls))
        policy = PostingPolicy(
            posts_per_hour=own.posts_per_hour,
            in_flight_seconds=own.postiz_limits.timeout_seconds + IN_FLIGHT_MARGIN_SECONDS,
            reconcile_grace_seconds=own.reconcile_grace_seconds,
        )
        publisher = Publisher(
            PublisherStore(pool),
            postiz,
            own.api_key_cipher(),
            jobs,
            policy,
            egress,
        )
        publisher_pb2_grpc.add_PublisherServiceServicer_to_server(
            PublisherServicer(publisher, reply_budget(settings.max_message_bytes)), handlers
        )
        try:
            yield
        finally:
            await jobs.aclose()
            await postiz.aclose()

    return ServiceDefinition(
        name="publisher",
        grpc_service="publisher.v1.PublisherService",
        default_port=50053,
        migrations=Path(__file__).parent / "migrations",
        servicers=servicers,
    )


PUBLISHER = publisher_definition()
