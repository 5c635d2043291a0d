"""The suite's one channel factory and its one retry policy, for every caller: workers, suitectl
and the services' own calls to each other (Publisher → Jobs).

deploy/grpc-service-config/ gives callers outside Python the same retry policy (a test keeps
the two equal).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc

from services.runtime.interceptors import profile_client_interceptors
from services.runtime.tracing import client_interceptors
from suite_client.errors import error_interceptors

DEFAULT_DEADLINE_SECONDS = 30.0
JOBS_SERVICE = "jobs.v1.JobService"
COSTS_SERVICE = "costs.v1.CostService"
PUBLISHER_SERVICE = "publisher.v1.PublisherService"


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's own retries (A6): calls that end UNAVAILABLE are tried again with exponential
    backoff. The suite's writes are safe to repeat: they roll back when they fail, and
    CreateJob and CreatePost are idempotent per request_id."""

    max_attempts: int = 5
    initial_backoff_seconds: float = 0.05
    max_backoff_seconds: float = 0.5
    backoff_multiplier: float = 2.0

    def as_config(self) -> dict:
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff_seconds}s",
            "maxBackoff": f"{self.max_backoff_seconds}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }


def service_config(
    grpc_service: str, deadline_seconds: float | None, retry: RetryPolicy | None
) -> str:
    """round_robin over every address the target resolves to (a headless Kubernetes service
    gives one per replica), the default deadline and the retry policy for the service.

    No client-side health checking (`healthCheckConfig`): its background Watch streams made
    children forked by the calling process crash (seen with subprocess's `user=`)."""
    method: dict = {"name": [{"service": grpc_service}]}
    if deadline_seconds is not None:
        method["timeout"] = f"{deadline_seconds}s"
    if retry is not None:
        method["retryPolicy"] = retry.as_config()
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [method],
        }
    )


def suite_channel(
    target: str,
    grpc_service: str,
    *,
    tls: bool | grpc.ChannelCredentials = False,
    deadline_seconds: float | None = DEFAULT_DEADLINE_SECONDS,
    retry: RetryPolicy | None = RetryPolicy(),
    interceptors: list[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """A channel to one service of the suite.

    `target` is any gRPC target (`dns:///jobs.video.svc:50051` for every replica). `tls`:
    True for the system's root certificates, or credentials of your own. Each call carries
    the current profile (see `profile_scope`) unless its metadata names one, never outlives
    the deadline of the call being served, and raises the exceptions of suite_client.errors.
    Calls are traced when tracing is on. `interceptors` run innermost.
    """
    options = [("grpc.service_config", service_config(grpc_service, deadline_seconds, retry))]
    chain = [
        *error_interceptors(),
        *profile_client_interceptors(),
        *client_interceptors(),
        *(interceptors or []),
    ]
    if tls is False:
        return grpc.aio.insecure_channel(target, options=options, interceptors=chain)
    credentials = grpc.ssl_channel_credentials() if tls is True else tls
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=chain)


def tls_credentials(
    server_ca: str | Path | None, cert: str | Path | None = None, key: str | Path | None = None
) -> grpc.ChannelCredentials | Literal[False]:
    """TLS trusting the CA file `server_ca`, presenting `cert` and `key` (files) for mutual TLS
    when given; False (plaintext) when no CA is given. For suite_channel's `tls`."""
    if not server_ca:
        return False
    return grpc.ssl_channel_credentials(
        root_certificates=Path(server_ca).read_bytes(),
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )


def jobs_channel(target: str = "localhost:50051", **options: Any) -> grpc.aio.Channel:
    """A channel to the Jobs service; `options` as for suite_channel."""
    return suite_channel(target, JOBS_SERVICE, **options)


def costs_channel(target: str = "localhost:50052", **options: Any) -> grpc.aio.Channel:
    """A channel to the Costs service; `options` as for suite_channel."""
    return suite_channel(target, COSTS_SERVICE, **options)


def publisher_channel(target: str = "localhost:50053", **options: Any) -> grpc.aio.Channel:
    """A channel to the Publisher service; `options` as for suite_channel."""
    return suite_channel(target, PUBLISHER_SERVICE, **options)
