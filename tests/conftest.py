"""Shared fixtures: a fresh database per test run, services on ephemeral loopback ports, and
stubs that speak for a profile."""

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
from costs.v1 import costs_pb2, costs_pb2_grpc
from google.protobuf import timestamp_pb2
from jobs.v1 import jobs_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from publisher.v1 import publisher_pb2, publisher_pb2_grpc

from bench.round_trips import via
from services.costs.service import costs_definition
from services.jobs.service import JOBS
from services.publisher.fake_postiz import FakePostiz, Organization, api_root, serve_fake_postiz
from services.publisher.service import publisher_definition
from services.publisher.settings import PostizLimits, PublisherSettings
from services.runtime.auth import mint_token
from services.runtime.embedded_postgres import (
    scratch_database,
    start_embedded_postgres,
)
from services.runtime.interceptors.handlers import InterceptorChain, WrappingInterceptor
from services.runtime.logs import configure_logging
from services.runtime.server import RunningService, ServiceDefinition, new_server, start_service
from services.runtime.settings import Settings

REPO = Path(__file__).resolve().parent.parent

# Every Jobs service the tests start retries a job whose lease expired after a short backoff,
# whichever replica's sweep finds it first (tests/test_jobs_leasing.py waits for the retry).
os.environ.setdefault("JOBS_RETRY_BASE_SECONDS", "0.2")

Metadata = tuple[tuple[str, str], ...]


@pytest.fixture(scope="session")
def admin_database_url() -> str:
    """The server to test against: DATABASE_URL, or an embedded one under .data/."""
    return os.environ.get("DATABASE_URL") or start_embedded_postgres(REPO / ".data/test-postgres")


@pytest.fixture(scope="session")
async def database_url(admin_database_url: str) -> AsyncIterator[str]:
    """A database made for this test run and dropped after it."""
    async with scratch_database(admin_database_url, "test") as url:
        yield url


@pytest.fixture(scope="session", autouse=True)
def _logging() -> None:
    configure_logging("INFO")


@pytest.fixture(scope="session", autouse=True)
def span_exporter() -> InMemorySpanExporter:
    """Tracing is on for every service the tests start; their spans end up here."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


# The deployment's page-token key, as AUTH_MODE=jwt requires one.
TEST_PAGE_TOKEN_KEY = "test-only-page-token-key-" + "0123456789abcdef" * 2


# Set by tests/test_pgbouncer.py, which runs store and service tests again with every service
# reaching the database through PgBouncer in transaction mode at this host:port (LISTEN direct).
THROUGH_POOLER = os.environ.get("TEST_THROUGH_POOLER", "")


def through_pooler(database_url: str) -> dict:
    """The settings that send a service's pool through THROUGH_POOLER (none without it)."""
    if not THROUGH_POOLER:
        return {}
    return {
        "database_url": via(database_url, THROUGH_POOLER),
        "db_transaction_pooler": True,
        "database_listen_url": database_url,
    }


def settings_for(database_url: str, **overrides: object) -> Settings:
    values: dict = {
        "database_url": database_url,
        "host": "127.0.0.1",
        "port": 0,
        "health_check_interval_seconds": 0.2,
        "shutdown_grace_seconds": 5.0,
        "metrics_port": 0,
        "access_log": "all",  # tests read the access lines of calls that succeed too
        "page_token_key": TEST_PAGE_TOKEN_KEY,
    }
    return Settings(**(values | through_pooler(database_url) | overrides))


@asynccontextmanager
async def running(
    definition: ServiceDefinition, settings: Settings
) -> AsyncIterator[RunningService]:
    service = await start_service(definition, settings)
    try:
        yield service
    finally:
        await service.stop(grace=1)


@asynccontextmanager
async def serving_test_service(
    interceptor: WrappingInterceptor, methods: dict[str, grpc.RpcMethodHandler]
) -> AsyncIterator[grpc.aio.Channel]:
    """`methods` as test.Service behind `interceptor` (registered as the services register
    theirs) on a loopback port, and a channel to it."""
    server, handlers = new_server(InterceptorChain(interceptor))
    handlers.add_registered_method_handlers("test.Service", methods)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(None)


@pytest.fixture(scope="session")
async def jobs_service(database_url: str) -> AsyncIterator[RunningService]:
    async with running(JOBS, settings_for(database_url)) as service:
        yield service


@pytest.fixture(scope="session")
async def jobs_channel(jobs_service: RunningService) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{jobs_service.port}") as channel:
        yield channel


@pytest.fixture(scope="session")
def jobs_stub(jobs_channel: grpc.aio.Channel) -> jobs_pb2_grpc.JobServiceStub:
    return jobs_pb2_grpc.JobServiceStub(jobs_channel)


# AUTH_MODE=jwt: the secret the services below verify with, and tokens signed with it.
# A constant: pytest may load this module twice (as conftest and as tests.conftest).
TEST_JWT_SECRET = "test-only-hs256-secret-" + "0123456789abcdef" * 3


def token_for(*profiles: str, secret: str = TEST_JWT_SECRET, **options: object) -> str:
    """A token of "test-caller" for these profiles (mint_token's options: operator, ...)."""
    return mint_token(secret, sub="test-caller", profiles=profiles, **options)


def bearer(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


def signed_in(profile_id: str, token: str | None = None) -> tuple[tuple[str, str], ...]:
    """Metadata acting for the profile with a token (by default one for that profile)."""
    return (*as_profile(profile_id), bearer(token or token_for(profile_id)))


@pytest.fixture(scope="session")
async def jwt_jobs_service(database_url: str) -> AsyncIterator[RunningService]:
    """The Jobs service with AUTH_MODE=jwt (HS256, TEST_JWT_SECRET)."""
    settings = settings_for(database_url, auth_mode="jwt", auth_jwt_secret=TEST_JWT_SECRET)
    async with running(JOBS, settings) as service:
        yield service


@pytest.fixture(scope="session")
async def jwt_jobs_stub(
    jwt_jobs_service: RunningService,
) -> AsyncIterator[jobs_pb2_grpc.JobServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{jwt_jobs_service.port}") as channel:
        yield jobs_pb2_grpc.JobServiceStub(channel)


@pytest.fixture(scope="session")
async def fake_postiz() -> AsyncIterator[FakePostiz]:
    async with serve_fake_postiz() as fake:
        yield fake


# Small enough for tests to reach: the posting budget, the timeout of a hanging POST /posts,
# a profile's connections to its Postiz and the wait for one, the largest answer read.
TEST_POSTS_PER_HOUR = 5
TEST_POSTIZ_LIMITS = PostizLimits(
    timeout_seconds=2.0,
    connections_per_profile=4,
    pool_wait_seconds=0.2,
    max_response_bytes=6 * 1024 * 1024,  # above the reply budget: ListPosts pages by bytes
)
# The fake Postiz and the files it serves are on loopback, over http.
TEST_TRUSTED_HOSTS = frozenset({"127.0.0.1"})


def publisher_config(jobs_service: RunningService) -> PublisherSettings:
    """The Publisher's own settings for tests, calling the given Jobs service."""
    return PublisherSettings(
        encryption_keys={"test-key": secrets.token_bytes(32)},
        posts_per_hour=TEST_POSTS_PER_HOUR,
        postiz_limits=TEST_POSTIZ_LIMITS,
        postiz_get_attempts=3,
        postiz_retry_base_seconds=0.01,
        reconcile_grace_seconds=0,
        jobs_target=f"127.0.0.1:{jobs_service.port}",
        postiz_trusted_hosts=TEST_TRUSTED_HOSTS,
    )


@pytest.fixture(scope="session")
async def publisher_service(
    database_url: str, jobs_service: RunningService
) -> AsyncIterator[RunningService]:
    config = publisher_config(jobs_service)
    async with running(publisher_definition(config), settings_for(database_url)) as service:
        yield service


@pytest.fixture(scope="session")
async def publisher_channel(
    publisher_service: RunningService,
) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{publisher_service.port}") as channel:
        yield channel


@pytest.fixture(scope="session")
def publisher_stub(
    publisher_channel: grpc.aio.Channel,
) -> publisher_pb2_grpc.PublisherServiceStub:
    return publisher_pb2_grpc.PublisherServiceStub(publisher_channel)


@pytest.fixture(scope="session")
async def costs_service(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningService]:
    spool_path = tmp_path_factory.mktemp("costs") / "spool.jsonl"
    definition = costs_definition(spool_path=spool_path, spool_retry_seconds=0.1)
    async with running(definition, settings_for(database_url)) as service:
        yield service


@pytest.fixture(scope="session")
async def costs_channel(costs_service: RunningService) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{costs_service.port}") as channel:
        yield channel


@pytest.fixture(scope="session")
def costs_stub(costs_channel: grpc.aio.Channel) -> costs_pb2_grpc.CostServiceStub:
    return costs_pb2_grpc.CostServiceStub(costs_channel)


@pytest.fixture
def targets(
    jobs_service: RunningService, costs_service: RunningService, publisher_service: RunningService
) -> list[str]:
    """suitectl's options naming the three services."""
    return [
        f"--jobs-target=127.0.0.1:{jobs_service.port}",
        f"--costs-target=127.0.0.1:{costs_service.port}",
        f"--publisher-target=127.0.0.1:{publisher_service.port}",
    ]


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


async def expect_status(call: Awaitable[object], code: grpc.StatusCode) -> str:
    """The details of the error `call` ends with, which must have status `code`."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code, raised.value.details()
    return raised.value.details() or ""


def request_id() -> str:
    return f"req-{uuid.uuid4()}"


async def record_tts(
    stub: costs_pb2_grpc.CostServiceStub,
    profile: Metadata,
    *,
    characters: int = 1000,
    **fields: Any,
) -> costs_pb2.CostEntry:
    request = costs_pb2.RecordElevenLabsTTSRequest(
        request_id=fields.pop("request_id", request_id()),
        model_id=fields.pop("model_id", "eleven_flash_v2_5"),
        voice_id=fields.pop("voice_id", "voice-1"),
        characters=characters,
        **fields,
    )
    response = await stub.RecordElevenLabsTTS(request, metadata=profile)
    assert not response.spooled
    return response.entry


async def record_gemini(
    stub: costs_pb2_grpc.CostServiceStub, profile: Metadata, **fields: Any
) -> costs_pb2.CostEntry:
    request = costs_pb2.RecordGeminiUsageRequest(
        request_id=fields.pop("request_id", request_id()),
        model=fields.pop("model", "gemini-2.5-flash"),
        **fields,
    )
    return (await stub.RecordGeminiUsage(request, metadata=profile)).entry


def new_profile_id() -> str:
    return f"store-{uuid.uuid4()}"


def as_profile(profile_id: str) -> tuple[tuple[str, str], ...]:
    return (("x-profile-id", profile_id),)


@pytest.fixture
def profile() -> tuple[tuple[str, str], ...]:
    """Metadata for a profile of this test's own."""
    return as_profile(new_profile_id())


@dataclass
class ServerProcess:
    """A service started as its own process, as an operator would run it."""

    process: asyncio.subprocess.Process
    port: int
    output: list[str]

    async def terminate(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), timeout=30)


@asynccontextmanager
async def server_process(
    service: str, database_url: str, wrapper: tuple[str, ...] = (), **env: str
) -> AsyncIterator[ServerProcess]:
    """Runs `python -m services.<service>` on an ephemeral port until the block ends, under
    `wrapper` if given (a command that execs the rest, such as prlimit)."""
    process = await asyncio.create_subprocess_exec(
        *wrapper,
        sys.executable,
        "-m",
        f"services.{service}",
        env=os.environ
        | {
            "DATABASE_URL": database_url,
            "GRPC_HOST": "127.0.0.1",
            "GRPC_PORT": "0",
            "METRICS_PORT": "0",
        }
        | env,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    output: list[str] = []
    assert process.stderr is not None
    port = None
    while port is None:
        line = (await asyncio.wait_for(process.stderr.readline(), timeout=60)).decode()
        if not line:
            raise RuntimeError("server exited before serving:\n" + "".join(output))
        output.append(line)
        if match := re.search(r"serving \S+ on 127\.0\.0\.1:(\d+)", line):
            port = int(match.group(1))

    async def collect() -> None:
        while line := await process.stderr.readline():
            output.append(line.decode())

    collector = asyncio.create_task(collect())
    server = ServerProcess(process, port, output)
    try:
        yield server
    finally:
        if process.returncode is None:
            process.terminate()  # a graceful stop, which also writes out buffered log lines
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
        await process.wait()
        await collector


class DisposablePostgres:
    """A PostgreSQL server of the test's own, which the test may stop and start again.

    pg_ctl runs as a plain child process (through runuser when we are root), never through
    pgserver's preexec_fn, which is unsafe once gRPC's threads are running.
    """

    def __init__(self, data_dir: Path) -> None:
        import pgserver
        from pgserver._commands import POSTGRES_BIN_PATH

        self._data_dir = data_dir
        self._server = pgserver.get_server(data_dir, cleanup_mode="delete")
        self.url = self._server.get_uri()
        user = self._server.system_user
        self._pg_ctl = [
            *(["runuser", "-u", user, "--"] if user else []),
            str(POSTGRES_BIN_PATH / "pg_ctl"),
            "-D",
            str(self._server.pgdata),
            "-w",
        ]
        socket_dir = parse_qs(urlsplit(self.url).query)["host"][0]
        self._start_options = ["-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(self._server.log)]

    def stop(self) -> None:
        subprocess.run([*self._pg_ctl, "-m", "fast", "stop"], check=True, capture_output=True)

    def start(self) -> None:
        subprocess.run(
            [*self._pg_ctl, *self._start_options, "start"], check=True, capture_output=True
        )

    def remove(self) -> None:
        import psutil  # pgserver's own dependency

        subprocess.run([*self._pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        # After a test stopped and started the server, the postmaster pgserver started is
        # gone, and its cleanup fails to signal it (unless the process lingers as a zombie):
        # the data directory is then removed here.
        with contextlib.suppress(psutil.NoSuchProcess):
            self._server.cleanup()
        shutil.rmtree(self._data_dir, ignore_errors=True)


@pytest.fixture
def disposable_postgres() -> Iterator[DisposablePostgres]:
    # Not under pytest's temporary root: any pytest run on the machine resets that root to
    # mode 0700, which locks pgserver's system user out of a data directory inside it.
    server = DisposablePostgres(Path(tempfile.mkdtemp(prefix="disposable-postgres-")))
    try:
        yield server
    finally:
        server.remove()


@dataclass
class PostizProfile:
    """A profile of the test's own, connected to an organization of its own in the fake."""

    metadata: tuple[tuple[str, str], ...]
    organization: Organization


async def connect_profile(
    stub: publisher_pb2_grpc.PublisherServiceStub, fake: FakePostiz, **organization: int
) -> PostizProfile:
    org = fake.add_organization(**organization)
    metadata = as_profile(new_profile_id())
    await stub.SetPostizCredentials(
        publisher_pb2.SetPostizCredentialsRequest(base_url=api_root(fake), api_key=org.api_key),
        metadata=metadata,
    )
    return PostizProfile(metadata, org)


@pytest.fixture
async def postiz_profile(
    publisher_stub: publisher_pb2_grpc.PublisherServiceStub, fake_postiz: FakePostiz
) -> PostizProfile:
    return await connect_profile(publisher_stub, fake_postiz)


_FAULT_FIGURES = pytest.StashKey[dict[str, dict[str, int]]]()


@pytest.fixture(scope="session")
def fault_figures(pytestconfig: pytest.Config) -> dict[str, dict[str, int]]:
    """Where fault tests put their figures (calls made, faults injected, writes lost, posts
    duplicated), by test; printed at the end of the run."""
    return pytestconfig.stash.setdefault(_FAULT_FIGURES, {})


_NOISY_NEIGHBOUR_FIGURES = pytest.StashKey[dict[str, str]]()


@pytest.fixture(scope="session")
def noisy_neighbour_figures(pytestconfig: pytest.Config) -> dict[str, str]:
    """One line per noisy-neighbour scenario (tests/test_noisy_neighbours.py), by scenario;
    printed at the end of the run."""
    return pytestconfig.stash.setdefault(_NOISY_NEIGHBOUR_FIGURES, {})


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    _write_fault_figures(terminalreporter, config.stash.get(_FAULT_FIGURES, {}))
    noisy = config.stash.get(_NOISY_NEIGHBOUR_FIGURES, {})
    if noisy:
        terminalreporter.section("noisy-neighbour figures")
        for name, line in sorted(noisy.items()):
            terminalreporter.write_line(f"{name}: {line}")


def _write_fault_figures(terminalreporter: Any, figures: dict[str, dict[str, int]]) -> None:
    if not figures:
        return
    terminalreporter.section("fault figures")
    totals: dict[str, int] = {}
    for name, values in figures.items():
        terminalreporter.write_line(f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
        for key, value in values.items():
            totals[key] = totals.get(key, 0) + value
    terminalreporter.write_line("total: " + ", ".join(f"{k}={v}" for k, v in totals.items()))
