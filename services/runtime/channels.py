"""Channels to the other services of the suite, for calls made while serving a call.

Every such channel carries the call context (profile, the caller's token, what is left of the
deadline: profile_client_interceptors) and speaks TLS when GRPC_TLS_SERVER_CA is set, with
the service's own GRPC_TLS_CERT and GRPC_TLS_KEY as its client certificate for mutual TLS.
"""

from pathlib import Path

import grpc

from services.runtime.interceptors.client import profile_client_interceptors
from services.runtime.settings import Settings


def channel_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """TLS to the other services, or None (plaintext) when no server CA is set."""
    if not settings.tls_server_ca:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=Path(settings.tls_server_ca).read_bytes(),
        private_key=Path(settings.tls_key).read_bytes() if settings.tls_key else None,
        certificate_chain=Path(settings.tls_cert).read_bytes() if settings.tls_cert else None,
    )


def service_channel(target: str, settings: Settings) -> grpc.aio.Channel:
    """A channel to `target` ("jobs:50051") that passes the call context on."""
    interceptors = profile_client_interceptors()
    credentials = channel_credentials(settings)
    if credentials is None:
        return grpc.aio.insecure_channel(target, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, interceptors=interceptors)
