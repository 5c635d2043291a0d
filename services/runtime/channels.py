"""TLS for the calls one service makes to another (suite_client's channels carry the call
context): on when GRPC_TLS_SERVER_CA is set, with the service's own GRPC_TLS_CERT and
GRPC_TLS_KEY as its client certificate for mutual TLS.
"""

from pathlib import Path

import grpc

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
