"""Rotating the key that encrypts Postiz API keys, across instances with different keys.

Each test runs its Publisher instances on a database of its own, so that `reencrypt` meets only
rows whose keys the test holds.
"""

import base64
import dataclasses
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from publisher.v1 import publisher_pb2, publisher_pb2_grpc

from services.publisher.fake_postiz import FakePostiz, Organization, api_root
from services.publisher.reencryption import reencrypt
from services.publisher.service import publisher_definition
from services.publisher.settings import PublisherSettings
from services.runtime.embedded_postgres import scratch_database
from services.runtime.server import RunningService
from tests.conftest import (
    as_profile,
    expect_status,
    new_profile_id,
    publisher_config,
    running,
    settings_for,
)
from tests.test_suitectl import suitectl

K1, K2 = secrets.token_bytes(32), secrets.token_bytes(32)
Stub = publisher_pb2_grpc.PublisherServiceStub


@pytest.fixture
async def rotation_database(admin_database_url: str) -> AsyncIterator[str]:
    async with scratch_database(admin_database_url, "test_rotation") as url:
        yield url


@pytest.fixture(scope="module")
def base_config(jobs_service: RunningService) -> PublisherSettings:
    return publisher_config(jobs_service)


def keyed(config: PublisherSettings, ring: Sequence[str], encrypting: str) -> PublisherSettings:
    keys = {"k1": K1, "k2": K2}
    return dataclasses.replace(
        config, encryption_keys={k: keys[k] for k in ring}, encryption_key_id=encrypting
    )


class Instance:
    """One Publisher instance (a pod) with its own key settings, and a stub that calls it."""

    def __init__(self, service: RunningService, stub: Stub) -> None:
        self.service = service
        self.stub = stub


@asynccontextmanager
async def instance(database_url: str, config: PublisherSettings) -> AsyncIterator[Instance]:
    async with (
        running(
            publisher_definition(config), settings_for(database_url, db_pool_max_size=2)
        ) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        yield Instance(service, Stub(channel))


class Workload:
    """Every profile's calls through every live instance; failures counted by status."""

    def __init__(self, fake: FakePostiz, profiles: int) -> None:
        self.fake = fake
        self.profiles = [(new_profile_id(), fake.add_organization()) for _ in range(profiles)]
        self.calls = 0
        self.failures: Counter[str] = Counter()
        self.connected = False  # whether the profiles have credentials to read yet

    async def _call(self, call) -> None:
        self.calls += 1
        try:
            await call
        except grpc.aio.AioRpcError as error:
            self.failures[f"{error.code().name}: {error.details()}"] += 1

    async def set_credentials(self, stub: Stub, profile_id: str, org: Organization) -> None:
        request = publisher_pb2.SetPostizCredentialsRequest(
            base_url=api_root(self.fake), api_key=org.api_key
        )
        await self._call(stub.SetPostizCredentials(request, metadata=as_profile(profile_id)))

    async def read_everywhere(self, instances: Sequence[Instance], profile_id: str) -> None:
        for each in instances:
            request = publisher_pb2.ListIntegrationsRequest()
            await self._call(each.stub.ListIntegrations(request, metadata=as_profile(profile_id)))

    async def run(self, *instances: Instance) -> None:
        """Each profile: read what earlier instances wrote, then write through each instance
        in turn and read through all."""
        for profile_id, org in self.profiles:
            if self.connected:
                await self.read_everywhere(instances, profile_id)
            for writer in instances:
                await self.set_credentials(writer.stub, profile_id, org)
                await self.read_everywhere(instances, profile_id)
        self.connected = True


async def key_ids(database_url: str) -> Counter[str]:
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch("SELECT encryption_key_id FROM publisher.postiz_credentials")
    finally:
        await connection.close()
    return Counter(row["encryption_key_id"] for row in rows)


async def test_calls_never_fail_while_a_new_key_rolls_out_is_moved_to_and_the_old_retired(
    rotation_database, base_config, fake_postiz, fault_figures
):
    workload = Workload(fake_postiz, profiles=4)
    old, both_k1 = keyed(base_config, ["k1"], "k1"), keyed(base_config, ["k1", "k2"], "k1")
    both_k2, only_k2 = keyed(base_config, ["k1", "k2"], "k2"), keyed(base_config, ["k2"], "k2")
    async with AsyncExitStack() as pods:
        # Phase 1: k2 added for decryption only, pod by pod; k1 still encrypts everywhere.
        a = await pods.enter_async_context(instance(rotation_database, old))
        b = await pods.enter_async_context(instance(rotation_database, both_k1))
        await workload.run(a, b)
        a_next = await pods.enter_async_context(instance(rotation_database, both_k1))
        await workload.run(a, a_next, b)
    async with AsyncExitStack() as pods:
        # Phase 2: every pod holds k2; now it encrypts, pod by pod.
        a = await pods.enter_async_context(instance(rotation_database, both_k1))
        b = await pods.enter_async_context(instance(rotation_database, both_k2))
        await workload.run(a, b)
        a_next = await pods.enter_async_context(instance(rotation_database, both_k2))
        await workload.run(a, a_next, b)
        await workload.set_credentials(a.stub, *workload.profiles[0])  # one row left on k1
        assert (await key_ids(rotation_database))["k1"] == 1
        report = await reencrypt(settings_for(rotation_database), both_k2)
        assert (await reencrypt(settings_for(rotation_database), both_k2)).moved == 0
    assert await key_ids(rotation_database) == {"k2": len(workload.profiles)}
    async with AsyncExitStack() as pods:
        # Phase 3: k1 retired, pod by pod.
        a = await pods.enter_async_context(instance(rotation_database, both_k2))
        b = await pods.enter_async_context(instance(rotation_database, only_k2))
        await workload.run(a, b)
    fault_figures["key_rotation_rolling_deploy"] = {
        "calls": workload.calls,
        "failed calls": sum(workload.failures.values()),
        "rows moved": report.moved,
    }
    assert not workload.failures, workload.failures
    assert report.moved == 1
    assert not report.unreadable


@pytest.fixture
async def publisher(rotation_database, base_config) -> AsyncIterator[Instance]:
    async with instance(rotation_database, keyed(base_config, ["k1", "k2"], "k2")) as pod:
        yield pod


async def connected(pod: Instance, fake: FakePostiz) -> tuple[str, Organization]:
    profile_id, org = new_profile_id(), fake.add_organization()
    await pod.stub.SetPostizCredentials(
        publisher_pb2.SetPostizCredentialsRequest(base_url=api_root(fake), api_key=org.api_key),
        metadata=as_profile(profile_id),
    )
    return profile_id, org


async def execute(database_url: str, query: str, *args: object) -> None:
    """As the database's owner, past row-level security: what an attacker with the database
    might do."""
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(query, *args)
    finally:
        await connection.close()


async def test_a_row_pointed_at_another_base_url_asks_for_credentials_again(
    publisher, rotation_database, fake_postiz
):
    profile_id, _ = await connected(publisher, fake_postiz)
    await execute(
        rotation_database,
        "UPDATE publisher.postiz_credentials SET base_url = $2 WHERE profile_id = $1",
        profile_id,
        api_root(fake_postiz) + "/elsewhere",
    )
    details = await expect_status(
        publisher.stub.ListIntegrations(
            publisher_pb2.ListIntegrationsRequest(), metadata=as_profile(profile_id)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "SetPostizCredentials" in details


async def test_a_ciphertext_copied_to_another_profile_asks_for_credentials_again(
    publisher, rotation_database, fake_postiz
):
    victim, _ = await connected(publisher, fake_postiz)
    thief, _ = await connected(publisher, fake_postiz)
    await execute(
        rotation_database,
        """
        UPDATE publisher.postiz_credentials t
        SET api_key_ciphertext = v.api_key_ciphertext, encryption_key_id = v.encryption_key_id
        FROM publisher.postiz_credentials v WHERE t.profile_id = $2 AND v.profile_id = $1
        """,
        victim,
        thief,
    )
    details = await expect_status(
        publisher.stub.ListIntegrations(
            publisher_pb2.ListIntegrationsRequest(), metadata=as_profile(thief)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "SetPostizCredentials" in details


async def test_reading_a_row_sealed_under_an_older_key_leaves_it_as_it_was(
    rotation_database, base_config, fake_postiz
):
    async with instance(rotation_database, keyed(base_config, ["k1"], "k1")) as old:
        profile_id, _ = await connected(old, fake_postiz)
    async with instance(rotation_database, keyed(base_config, ["k1", "k2"], "k2")) as new:
        await new.stub.ListIntegrations(
            publisher_pb2.ListIntegrationsRequest(), metadata=as_profile(profile_id)
        )
    connection = await asyncpg.connect(rotation_database)
    try:
        key_id = await connection.fetchval(
            "SELECT encryption_key_id FROM publisher.postiz_credentials WHERE profile_id = $1",
            profile_id,
        )
    finally:
        await connection.close()
    assert key_id == "k1"


def encryption_keys(*ring: str) -> str:
    keys = {"k1": K1, "k2": K2}
    return ",".join(f"{k}:{base64.b64encode(keys[k]).decode()}" for k in ring)


async def test_suitectl_postiz_reencrypt_reports_the_rows_it_moved(
    rotation_database, base_config, fake_postiz
):
    async with instance(rotation_database, keyed(base_config, ["k1"], "k1")) as old:
        await connected(old, fake_postiz)
    environment = {
        "DATABASE_URL": rotation_database,
        "PUBLISHER_ENCRYPTION_KEYS": encryption_keys("k1", "k2"),
        "PUBLISHER_ENCRYPTION_KEY_ID": "k2",
    }
    moved = await suitectl("postiz", "reencrypt", **environment)
    again = await suitectl("postiz", "reencrypt", **environment)
    assert moved.exit_code == 0, moved.stderr
    assert moved.stdout.startswith("publisher: 1 row(s) moved to key 'k2'")
    assert "0 unreadable" in moved.stdout
    assert again.stdout.startswith("publisher: 0 row(s) moved to key 'k2'")


async def test_suitectl_postiz_reencrypt_fails_naming_a_row_it_cannot_read(
    rotation_database, base_config, fake_postiz
):
    async with instance(rotation_database, keyed(base_config, ["k1"], "k1")) as old:
        profile_id, _ = await connected(old, fake_postiz)
    outcome = await suitectl(
        "postiz",
        "reencrypt",
        DATABASE_URL=rotation_database,
        PUBLISHER_ENCRYPTION_KEYS=encryption_keys("k2"),
    )
    assert outcome.exit_code == 1
    assert profile_id in outcome.stdout


def with_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    server = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}@{server}"))


async def test_suitectl_postiz_reencrypt_as_a_role_outside_the_service_says_which_to_use(
    publisher, rotation_database
):
    role = f"not_the_service_{secrets.token_hex(4)}"
    await execute(rotation_database, f"CREATE ROLE {role} LOGIN")
    try:
        outcome = await suitectl(
            "postiz",
            "reencrypt",
            DATABASE_URL=with_user(rotation_database, role),
            PUBLISHER_ENCRYPTION_KEYS=encryption_keys("k2"),
        )
    finally:
        await execute(rotation_database, f"DROP ROLE {role}")
    assert outcome.exit_code == 1
    assert "publisher_service" in outcome.stderr
    assert "Traceback" not in outcome.stderr
