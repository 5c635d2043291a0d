"""The dev overlay's pods, run on this machine against a database of their own: PostgreSQL set up
by the overlay's init script (deploy/sql/bootstrap.sql with the overlay's passwords), then each
service's migrate init container and its server, each with the arguments and environment its
manifest gives it (database URLs pointed at the test server). Each service logs in as its own
role, which reaches its own schema only."""

import asyncio
import contextlib
import os
import secrets
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from costs.v1 import costs_pb2, costs_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from services.jobs.service import JOBS
from services.runtime.auth import mint_token
from services.runtime.embedded_postgres import with_database
from services.runtime.server import ServiceDefinition
from tests.conftest import (
    ServerProcess,
    new_profile_id,
    server_process,
    signed_in,
)
from tests.kubernetes_manifests import (
    DEPLOY,
    DEV_SIGNING_KEY,
    OVERLAYS,
    Manifest,
    container_environment,
    find,
    render,
    resolved,
    server_container,
    server_pod_spec,
    service_definitions,
)

DEV = OVERLAYS["dev"]
ROLE_NAMES = [
    f"{name}{suffix}" for name in ("jobs", "costs", "publisher") for suffix in ("", "_owner")
]
SERVICES = pytest.mark.parametrize(
    "service", service_definitions(), ids=lambda definition: definition.name
)


def psql_folder() -> str:
    psql = shutil.which("psql")
    if psql is None:
        from pgserver._commands import POSTGRES_BIN_PATH

        return str(POSTGRES_BIN_PATH)
    return str(Path(psql).parent)


def pointed_at(url: str, test_server_url: str) -> str:
    """`url` with its user and password, on the test server and its database."""
    ours, theirs = urlsplit(url), urlsplit(test_server_url)
    credentials = ours.netloc.rsplit("@", 1)[0]
    server = theirs.netloc.rsplit("@", 1)[-1]
    return urlunsplit(theirs._replace(netloc=f"{credentials}@{server}"))


def environment_of(container: Manifest, database_url: str, scratch: Path) -> dict[str, str]:
    """The container's variables as this machine runs it: secrets read from the overlay, the
    database URL pointed at the test server, paths on its volumes moved under `scratch`."""
    manifests = render(DEV)
    environment = {}
    for name, source in container_environment(manifests, container).items():
        value = resolved(manifests, source)
        for mount in container.get("volumeMounts", []):
            if value.startswith(mount["mountPath"]):
                value = str(scratch / mount["name"]) + value.removeprefix(mount["mountPath"])
                Path(value).parent.mkdir(parents=True, exist_ok=True)
        environment[name] = value
    environment["DATABASE_URL"] = pointed_at(environment["DATABASE_URL"], database_url)
    return environment


@pytest.fixture(scope="module")
async def dev_database(admin_database_url: str) -> AsyncIterator[str]:
    """A database set up as the overlay's PostgreSQL sets itself up on first start."""
    name = f"test_dev_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(admin_database_url)
    await admin.execute(f"CREATE DATABASE {name}")
    url = with_database(admin_database_url, name)
    manifests = render(DEV)
    postgres = find(manifests, "StatefulSet", "postgres")["spec"]["template"]["spec"]
    (container,) = postgres["containers"]
    passwords = {
        variable: resolved(manifests, source)
        for variable, source in container_environment(manifests, container).items()
        if source.secret is not None
    }
    script = (DEV / "init-roles.sh").read_text()
    script = script.replace("/bootstrap/bootstrap.sql", str(DEPLOY / "sql/bootstrap.sql"))
    parts = urlsplit(admin_database_url)
    environment = {
        "PATH": f"{psql_folder()}:{os.environ['PATH']}",
        "PGHOST": parts.hostname or parse_qs(parts.query)["host"][0],
        "PGPORT": str(parts.port or 5432),
        "POSTGRES_USER": parts.username or "postgres",
        "POSTGRES_DB": name,
    }
    initialised = await asyncio.create_subprocess_exec(
        "sh", "-c", script, env=environment | passwords, stdout=asyncio.subprocess.DEVNULL
    )
    assert await asyncio.wait_for(initialised.wait(), 60) == 0
    try:
        yield url
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        for role in ROLE_NAMES:
            # Roles belong to the whole server: a database another run left behind may still
            # hold privileges granted to one, and then it stays for that run to drop.
            with contextlib.suppress(asyncpg.DependentObjectsStillExistError):
                await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


@pytest.fixture(scope="module")
async def dev_pods(
    dev_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, ServerProcess]]:
    """Every service's pod: its migrate init container run to the end, then its server."""
    pods = {}
    async with contextlib.AsyncExitStack() as stack:
        for definition in service_definitions():
            spec = server_pod_spec(render(DEV), definition.name)
            scratch = tmp_path_factory.mktemp(definition.name)
            for init in spec["initContainers"]:
                migrated = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    *init["args"],
                    env=os.environ | environment_of(init, dev_database, scratch),
                )
                assert await asyncio.wait_for(migrated.wait(), 60) == 0
            server = server_container(render(DEV), definition.name)
            assert server["args"] == [f"services.{definition.name}"]
            environment = environment_of(server, dev_database, scratch)
            database_url = environment.pop("DATABASE_URL")
            # The test's server takes free ports, so another run on the machine cannot collide.
            environment.pop("GRPC_PORT")
            environment.pop("METRICS_PORT", None)
            pods[definition.name] = await stack.enter_async_context(
                server_process(definition.name, database_url, **environment)
            )
        yield pods


@SERVICES
async def test_the_server_answers_both_probes(service: ServiceDefinition, dev_pods):
    container = server_container(render(DEV), service.name)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{dev_pods[service.name].port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for probe in ("readinessProbe", "livenessProbe"):
            request = health_pb2.HealthCheckRequest(service=container[probe]["grpc"]["service"])
            reply = await health.Check(request, timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, probe


@SERVICES
async def test_the_schema_belongs_to_the_owner_role_the_migrations_ran_as(
    service: ServiceDefinition, dev_pods, dev_database
):
    connection = await asyncpg.connect(dev_database)
    try:
        owner = await connection.fetchval(
            "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = $1", service.name
        )
        owners = await connection.fetch(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = $1", service.name
        )
    finally:
        await connection.close()
    assert owner == f"{service.name}_owner"
    assert [row["tableowner"] for row in owners] == [owner]


@SERVICES
async def test_the_login_role_reaches_its_own_schema_only(
    service: ServiceDefinition, dev_pods, dev_database
):
    login = service.name
    connection = await asyncpg.connect(dev_database)
    try:
        check = connection.fetchval
        assert await check("SELECT pg_has_role($1, $2, 'MEMBER')", login, service.database_role)
        assert not await check("SELECT has_schema_privilege($1, $2, 'CREATE')", login, login)
        for other in ("jobs", "costs", "publisher"):
            if other != service.name:
                assert not await check(
                    "SELECT pg_has_role($1, $2, 'MEMBER')", login, f"{other}_service"
                )
        assert not await check("SELECT pg_has_role($1, $2, 'MEMBER')", login, f"{login}_owner")
        for schema in [d.name for d in service_definitions() if d.name != service.name]:
            assert not await check("SELECT has_schema_privilege($1, $2, 'USAGE')", login, schema)
    finally:
        await connection.close()


def _signed_in_to(service: str, profile_id: str):
    """Metadata with a token the dev overlay's `service` accepts, for `profile_id`."""
    manifests = render(DEV)
    variables = container_environment(manifests, server_container(manifests, service))
    token = mint_token(
        DEV_SIGNING_KEY.read_text(),
        sub="dev",
        profiles=[profile_id],
        algorithm="ES256",
        key_id="dev",
        audience=[resolved(manifests, variables["AUTH_JWT_AUDIENCE"])],
        issuer=resolved(manifests, variables["AUTH_JWT_ISSUER"]),
    )
    return signed_in(profile_id, token)


async def test_jobs_serves_calls_as_its_login_role(dev_pods):
    profile_id = new_profile_id()
    metadata = _signed_in_to(JOBS.name, profile_id)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{dev_pods[JOBS.name].port}") as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        job = await jobs.CreateJob(
            jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="video_render")), metadata=metadata
        )
        fetched = await jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=metadata)
    assert fetched.job_id == job.job_id


async def test_costs_records_and_checks_budgets_as_its_login_role(dev_pods):
    """The schema's call functions switch to costs_service from the login role `costs`."""
    profile_id = new_profile_id()
    metadata = _signed_in_to("costs", profile_id)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{dev_pods['costs'].port}") as channel:
        costs = costs_pb2_grpc.CostServiceStub(channel)
        await costs.SetBudget(
            costs_pb2.SetBudgetRequest(period=costs_pb2.MONTHLY, limit_usd="10"), metadata=metadata
        )
        entry = await costs.RecordElevenLabsTTS(
            costs_pb2.RecordElevenLabsTTSRequest(
                request_id="dev-1", model_id="eleven_multilingual_v2", characters=1000
            ),
            metadata=metadata,
        )
        checked = await costs.CheckBudget(
            costs_pb2.CheckBudgetRequest(estimated_cost_usd="0.01"), metadata=metadata
        )
    assert entry.entry.priced
    assert checked.allowed
    assert checked.budgets[0].spent_usd == entry.entry.cost_usd
