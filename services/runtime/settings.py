"""Configuration from environment variables, read once at start-up (see the README's table)."""

import os
from dataclasses import dataclass, field

from services.runtime.interceptors.server import ACCESS_LOG_FAILURES, ACCESS_LOG_MODES

AUTH_MODES = ("none", "jwt")
PAGE_TOKEN_KEY_MIN_LENGTH = 32
PAGE_TOKEN_KEY_HOWTO = "python3 -c 'import secrets;print(secrets.token_urlsafe(32))'"


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return default if raw in (None, "") else int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a whole number, got {raw!r}") from None


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return default if raw in (None, "") else float(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a number, got {raw!r}") from None


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    return default if raw == "" else raw in ("1", "true", "yes", "on")


def env_port_or_off(name: str, default: int | None) -> int | None:
    """A port; unset gives the default, empty or `off` gives None (switched off)."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    if raw.strip().lower() in ("", "off"):
        return None
    return env_int(name, 0)


@dataclass(frozen=True)
class Settings:
    database_url: str
    host: str = "[::]"
    port: int = 50051
    db_pool_min_size: int = 1
    db_pool_max_size: int = 10
    migrate_on_start: bool = True
    shutdown_grace_seconds: float = 10.0
    # After SIGTERM, how long health says NOT_SERVING while calls are still taken, so that
    # clients watching health (deploy/grpc-service-config/) move to other replicas first.
    shutdown_drain_seconds: float = 0.0
    health_check_interval_seconds: float = 5.0
    max_message_bytes: int = 4 * 1024 * 1024
    max_connection_age_seconds: float = 300.0
    db_connect_timeout_seconds: float = 60.0
    workers: int = 1
    # Who may act for a profile (services.runtime.auth): "none" trusts x-profile-id.
    auth_mode: str = "none"
    auth_jwt_secret: str = field(default="", repr=False)
    auth_jwt_public_key: str = ""  # PEM text, a JWK set, or a file path holding either
    # Checked when set: `aud` must name the audience, `iss` must equal the issuer.
    auth_jwt_audience: str = ""
    auth_jwt_issuer: str = ""
    auth_jwt_max_lifetime_seconds: float = 86400.0  # longest exp - iat accepted
    # TLS on the gRPC port (file paths); a client CA makes it mutual TLS.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # The CA of the other services' certificates: calls to them use TLS (tls_credentials).
    tls_server_ca: str = ""

    def __post_init__(self) -> None:
        if self.auth_mode not in AUTH_MODES:
            raise SystemExit(f"AUTH_MODE must be one of {', '.join(AUTH_MODES)}")
        if self.auth_mode == "jwt" and bool(self.auth_jwt_secret) == bool(self.auth_jwt_public_key):
            raise SystemExit(
                "AUTH_MODE=jwt needs exactly one of AUTH_JWT_SECRET (HS256) "
                "or AUTH_JWT_PUBLIC_KEY (ES256)"
            )
        if self.auth_jwt_max_lifetime_seconds <= 0:
            raise SystemExit("AUTH_JWT_MAX_LIFETIME_SECONDS must be more than 0")
        if self.access_log not in ACCESS_LOG_MODES:
            raise SystemExit(f"ACCESS_LOG must be one of {', '.join(ACCESS_LOG_MODES)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SystemExit("GRPC_TLS_CERT and GRPC_TLS_KEY go together")
        if self.tls_client_ca and not self.tls_cert:
            raise SystemExit("GRPC_TLS_CLIENT_CA needs GRPC_TLS_CERT and GRPC_TLS_KEY")
        if self.page_token_key and len(self.page_token_key) < PAGE_TOKEN_KEY_MIN_LENGTH:
            raise SystemExit(
                f"PAGE_TOKEN_KEY must be at least {PAGE_TOKEN_KEY_MIN_LENGTH} characters"
            )
        if self.auth_mode == "jwt" and not self.page_token_key:
            raise SystemExit(
                f"AUTH_MODE=jwt needs PAGE_TOKEN_KEY; make one: {PAGE_TOKEN_KEY_HOWTO}"
            )
        limits = (
            self.profile_max_calls_in_flight,
            self.profile_queue_seconds,
            self.profile_max_streams,
            self.grpc_max_concurrent_streams,
            self.grpc_max_concurrent_rpcs,
        )
        if min(limits) < 0:
            raise SystemExit("the PROFILE_* and GRPC_MAX_CONCURRENT_* limits must not be negative")
        if min(self.profile_bytes_per_second, self.profile_bytes_burst) < 0:
            raise SystemExit(
                "PROFILE_BYTES_PER_SECOND and PROFILE_BYTES_BURST must not be negative"
            )
        if min(self.profile_calls_per_second, self.profile_calls_burst) < 0:
            raise SystemExit(
                "PROFILE_CALLS_PER_SECOND and PROFILE_CALLS_BURST must not be negative"
            )
        if self.db_connections_per_profile < 0:
            raise SystemExit("DB_CONNECTIONS_PER_PROFILE must not be negative (0: no share)")
        if min(self.db_acquire_timeout_seconds, self.db_statement_timeout_seconds) <= 0:
            raise SystemExit(
                "DB_ACQUIRE_TIMEOUT_SECONDS and DB_STATEMENT_TIMEOUT_SECONDS must be above 0"
            )

    # Calls traced when a tracer provider is installed (OTEL_EXPORTER_OTLP_ENDPOINT); False
    # keeps tracing off the call path whatever is installed (a test serving as deployed).
    trace_calls: bool = True
    metrics_port: int | None = None  # None: no /metrics endpoint; 0: any free port
    # Which calls get an access line: "failures" (and slow unary calls) or "all".
    access_log: str = ACCESS_LOG_FAILURES
    # Fair shares (see the README): per profile on this replica, calls in flight (beyond
    # them a call waits up to profile_queue_seconds) and response streams open; 0 is no limit.
    # Streams sit above Jobs' own watcher caps, which answer WatchJob first, more precisely.
    profile_max_calls_in_flight: int = 32
    profile_queue_seconds: float = 0.25
    profile_max_streams: int = 128
    # gRPC's own: streams per HTTP/2 connection (more wait in the client), calls in flight
    # per process (more are refused RESOURCE_EXHAUSTED); 0 is gRPC's default, no limit.
    grpc_max_concurrent_streams: int = 512
    grpc_max_concurrent_rpcs: int = 12_000
    # Waiting for a pool connection, and each statement: at most these, and the call's deadline.
    db_acquire_timeout_seconds: float = 5.0
    db_statement_timeout_seconds: float = 10.0
    # Each profile's share of the pool; beyond it the profile waits behind its own calls.
    db_connections_per_profile: int = 5
    # Each profile's bytes a second in requests and replies (runtime.byte_rates); 0: no limit.
    profile_bytes_per_second: int = 8 * 1024 * 1024
    profile_bytes_burst: int = 16 * 1024 * 1024
    # Each profile's calls a second, however cheap (runtime.call_rates); 0: no limit.
    profile_calls_per_second: int = 100
    profile_calls_burst: int = 200
    # The page tokens' checksum key (runtime.page_tokens); required with AUTH_MODE=jwt.
    page_token_key: str = field(default="", repr=False)
    # DATABASE_URL reaches Postgres through a pooler in transaction mode (PgBouncer): asyncpg's
    # cache of named prepared statements is off, since the next transaction may run on
    # another server connection. WatchJob's LISTEN needs a session of its own:
    # database_listen_url (DATABASE_LISTEN_URL) reaches the server directly; empty means
    # database_url.
    db_transaction_pooler: bool = False
    database_listen_url: str = ""

    @classmethod
    def from_environment(
        cls, default_port: int, default_metrics_port: int | None = None
    ) -> "Settings":
        database_url = os.environ.get("DATABASE_URL", "")
        if not database_url:
            raise SystemExit(
                "DATABASE_URL is required (`make run` starts an embedded database and saves "
                "its URL in .data/database-url, where `suitectl migrate` finds it)"
            )
        return cls(
            database_url=database_url,
            host=os.environ.get("GRPC_HOST", cls.host),
            port=env_int("GRPC_PORT", default_port),
            db_pool_min_size=env_int("DB_POOL_MIN_SIZE", cls.db_pool_min_size),
            db_pool_max_size=env_int("DB_POOL_MAX_SIZE", cls.db_pool_max_size),
            migrate_on_start=env_bool("MIGRATE_ON_START", cls.migrate_on_start),
            shutdown_grace_seconds=env_float("SHUTDOWN_GRACE_SECONDS", cls.shutdown_grace_seconds),
            shutdown_drain_seconds=env_float("SHUTDOWN_DRAIN_SECONDS", cls.shutdown_drain_seconds),
            health_check_interval_seconds=env_float(
                "HEALTH_CHECK_INTERVAL_SECONDS", cls.health_check_interval_seconds
            ),
            max_message_bytes=env_int("GRPC_MAX_MESSAGE_BYTES", cls.max_message_bytes),
            max_connection_age_seconds=env_float(
                "GRPC_MAX_CONNECTION_AGE_SECONDS", cls.max_connection_age_seconds
            ),
            db_connect_timeout_seconds=env_float(
                "DB_CONNECT_TIMEOUT_SECONDS", cls.db_connect_timeout_seconds
            ),
            workers=env_int("GRPC_WORKERS", cls.workers),
            auth_mode=os.environ.get("AUTH_MODE", cls.auth_mode).strip().lower() or "none",
            auth_jwt_secret=os.environ.get("AUTH_JWT_SECRET", ""),
            auth_jwt_public_key=os.environ.get("AUTH_JWT_PUBLIC_KEY", ""),
            auth_jwt_audience=os.environ.get("AUTH_JWT_AUDIENCE", "").strip(),
            auth_jwt_issuer=os.environ.get("AUTH_JWT_ISSUER", "").strip(),
            auth_jwt_max_lifetime_seconds=env_float(
                "AUTH_JWT_MAX_LIFETIME_SECONDS", cls.auth_jwt_max_lifetime_seconds
            ),
            tls_cert=os.environ.get("GRPC_TLS_CERT", ""),
            tls_key=os.environ.get("GRPC_TLS_KEY", ""),
            tls_client_ca=os.environ.get("GRPC_TLS_CLIENT_CA", ""),
            tls_server_ca=os.environ.get("GRPC_TLS_SERVER_CA", ""),
            metrics_port=env_port_or_off("METRICS_PORT", default_metrics_port),
            access_log=os.environ.get("ACCESS_LOG", cls.access_log).strip().lower()
            or ACCESS_LOG_FAILURES,
            profile_max_calls_in_flight=env_int(
                "PROFILE_MAX_CALLS_IN_FLIGHT", cls.profile_max_calls_in_flight
            ),
            profile_queue_seconds=env_float("PROFILE_QUEUE_SECONDS", cls.profile_queue_seconds),
            profile_max_streams=env_int("PROFILE_MAX_STREAMS", cls.profile_max_streams),
            grpc_max_concurrent_streams=env_int(
                "GRPC_MAX_CONCURRENT_STREAMS", cls.grpc_max_concurrent_streams
            ),
            grpc_max_concurrent_rpcs=env_int(
                "GRPC_MAX_CONCURRENT_RPCS", cls.grpc_max_concurrent_rpcs
            ),
            db_acquire_timeout_seconds=env_float(
                "DB_ACQUIRE_TIMEOUT_SECONDS", cls.db_acquire_timeout_seconds
            ),
            db_statement_timeout_seconds=env_float(
                "DB_STATEMENT_TIMEOUT_SECONDS", cls.db_statement_timeout_seconds
            ),
            db_connections_per_profile=env_int(
                "DB_CONNECTIONS_PER_PROFILE", cls.db_connections_per_profile
            ),
            profile_bytes_per_second=env_int(
                "PROFILE_BYTES_PER_SECOND", cls.profile_bytes_per_second
            ),
            profile_bytes_burst=env_int("PROFILE_BYTES_BURST", cls.profile_bytes_burst),
            profile_calls_per_second=env_int(
                "PROFILE_CALLS_PER_SECOND", cls.profile_calls_per_second
            ),
            profile_calls_burst=env_int("PROFILE_CALLS_BURST", cls.profile_calls_burst),
            page_token_key=os.environ.get("PAGE_TOKEN_KEY", "").strip(),
            db_transaction_pooler=env_bool("DB_TRANSACTION_POOLER", cls.db_transaction_pooler),
            database_listen_url=os.environ.get("DATABASE_LISTEN_URL", "").strip(),
        )
