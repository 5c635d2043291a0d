"""AUTH_MODE=jwt: who may act for a profile, proved by a signed token on every call."""

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import subprocess
import sys
import time
import uuid

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import field_mask_pb2
from jobs.v1 import jobs_pb2, jobs_pb2_grpc
from publisher.v1 import publisher_pb2, publisher_pb2_grpc

from services.jobs.service import JOBS
from services.publisher.fake_postiz import api_root
from services.publisher.service import publisher_definition
from services.runtime.auth import JwtAuthorizer, mint_token
from services.runtime.call_context import Caller, profile_scope
from services.runtime.interceptors import profile_client_interceptors
from services.runtime.settings import Settings
from tests.conftest import (
    REPO,
    TEST_JWT_SECRET,
    TEST_PAGE_TOKEN_KEY,
    as_profile,
    new_profile_id,
    publisher_config,
    running,
    settings_for,
    signed_in,
    token_for,
)

Code = grpc.StatusCode
SECRET = TEST_JWT_SECRET


async def status_of(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


def get_job(stub, metadata):
    return stub.GetJob(jobs_pb2.GetJobRequest(job_id=str(uuid.uuid4())), metadata=metadata)


async def test_call_with_a_valid_token_acts_for_the_profile(jwt_jobs_stub):
    profile_id = new_profile_id()
    metadata = signed_in(profile_id, token_for(profile_id, "other-profile"))
    job = await jwt_jobs_stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k")), metadata=metadata
    )
    assert job.profile_id == profile_id
    fetched = await jwt_jobs_stub.GetJob(
        jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=metadata
    )
    assert fetched.job_id == job.job_id


async def test_call_without_a_token_is_unauthenticated(jwt_jobs_stub):
    error = await status_of(get_job(jwt_jobs_stub, as_profile(new_profile_id())))
    assert error.code() == Code.UNAUTHENTICATED
    assert "Bearer" in error.details()


async def test_streaming_call_without_a_token_is_unauthenticated(jwt_jobs_stub):
    call = jwt_jobs_stub.WatchJob(
        jobs_pb2.WatchJobRequest(job_id=str(uuid.uuid4())), metadata=as_profile(new_profile_id())
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pass
    assert raised.value.code() == Code.UNAUTHENTICATED


def _unsigned(claims: dict) -> str:
    return jwt.encode(claims, None, algorithm="none")


def _claims(profile_id: str, **changes: object) -> dict:
    claims = {"sub": "test-caller", "profiles": [profile_id], "exp": int(time.time()) + 60}
    return {k: v for k, v in (claims | changes).items() if v is not None}


BAD_TOKENS = {
    "expired": lambda p: token_for(p, ttl_seconds=-60),
    "signed_with_another_secret": lambda p: token_for(p, secret=secrets.token_urlsafe(64)),
    "unsigned": lambda p: _unsigned(_claims(p)),
    "other_algorithm": lambda p: jwt.encode(_claims(p), SECRET, algorithm="HS512"),
    "without_exp": lambda p: jwt.encode(_claims(p, exp=None), SECRET, algorithm="HS256"),
    "without_profiles": lambda p: jwt.encode(_claims(p, profiles=None), SECRET),
    "profiles_not_a_list": lambda p: jwt.encode(_claims(p, profiles=p), SECRET),
    "not_a_jwt": lambda p: "not.a.jwt",
    "tampered": lambda p: token_for(p)[:-4] + "AAAA",
}


@pytest.mark.parametrize("make_token", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
async def test_bad_token_is_unauthenticated(jwt_jobs_stub, make_token):
    profile_id = new_profile_id()
    error = await status_of(get_job(jwt_jobs_stub, signed_in(profile_id, make_token(profile_id))))
    assert error.code() == Code.UNAUTHENTICATED, error.details()


async def test_authorization_without_bearer_is_unauthenticated(jwt_jobs_stub):
    profile_id = new_profile_id()
    metadata = (*as_profile(profile_id), ("authorization", token_for(profile_id)))
    error = await status_of(get_job(jwt_jobs_stub, metadata))
    assert error.code() == Code.UNAUTHENTICATED


async def test_profile_outside_the_token_is_permission_denied(jwt_jobs_stub):
    error = await status_of(
        get_job(jwt_jobs_stub, signed_in(new_profile_id(), token_for(new_profile_id())))
    )
    assert error.code() == Code.PERMISSION_DENIED
    assert "test-caller" in error.details()


async def test_access_log_names_the_caller(jwt_jobs_stub, caplog):
    caplog.set_level(logging.INFO)
    profile_id = new_profile_id()
    await status_of(get_job(jwt_jobs_stub, signed_in(profile_id, token_for(profile_id))))
    assert any(
        "GetJob NOT_FOUND" in record.getMessage() and "caller=test-caller" in record.getMessage()
        for record in caplog.records
    )


async def test_client_interceptor_forwards_the_callers_token(jwt_jobs_service):
    profile_id = new_profile_id()
    caller = Caller("publisher", authorization=f"Bearer {token_for(profile_id)}")
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{jwt_jobs_service.port}", interceptors=profile_client_interceptors()
    ) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        with profile_scope(profile_id, caller=caller):
            job = await stub.CreateJob(jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k")))
        with profile_scope(profile_id):
            refused = await status_of(stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id)))
    assert job.profile_id == profile_id
    assert refused.code() == Code.UNAUTHENTICATED


def _es256_keys() -> tuple[str, str]:
    private = ec.generate_private_key(ec.SECP256R1())
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private_pem, public_pem


@pytest.fixture(scope="module")
def es256_keys(tmp_path_factory) -> tuple[str, str, str]:
    """The private key, the public key, and the public key's file path."""
    private_pem, public_pem = _es256_keys()
    path = tmp_path_factory.mktemp("keys") / "public.pem"
    path.write_text(public_pem)
    return private_pem, public_pem, str(path)


@pytest.fixture(scope="module")
async def es256_jobs(database_url, es256_keys):
    settings = settings_for(database_url, auth_mode="jwt", auth_jwt_public_key=es256_keys[2])
    async with (
        running(JOBS, settings) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        yield jobs_pb2_grpc.JobServiceStub(channel)


async def test_es256_token_signed_with_the_private_key_is_accepted(es256_jobs, es256_keys):
    profile_id = new_profile_id()
    token = mint_token(es256_keys[0], sub="svc", profiles=[profile_id], algorithm="ES256")
    error = await status_of(get_job(es256_jobs, signed_in(profile_id, token)))
    assert error.code() == Code.NOT_FOUND


async def test_es256_service_refuses_hs256_token_made_with_its_public_key(es256_jobs, es256_keys):
    profile_id = new_profile_id()
    token = _hs256_signed_with(es256_keys[1], _claims(profile_id))
    error = await status_of(get_job(es256_jobs, signed_in(profile_id, token)))
    assert error.code() == Code.UNAUTHENTICATED


def _hs256_signed_with(key: str, claims: dict) -> str:
    """What an attacker who knows the public key would try (algorithm confusion)."""

    def part(value: bytes) -> str:
        return base64.urlsafe_b64encode(value).decode().rstrip("=")

    header = part(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = part(json.dumps(claims).encode())
    signature = hmac.new(key.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{part(signature)}"


async def test_mint_command_prints_a_token_the_service_accepts(jwt_jobs_stub):
    profile_id = new_profile_id()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.runtime.auth",
        "mint",
        "--sub",
        "grpcurl-user",
        "--profiles",
        f"{profile_id},store-2",
        "--ttl",
        "60",
        env={"AUTH_JWT_SECRET": SECRET, "PATH": ""},
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0
    error = await status_of(get_job(jwt_jobs_stub, signed_in(profile_id, out.decode().strip())))
    assert error.code() == Code.NOT_FOUND


@pytest.mark.parametrize(
    "values",
    [
        {"auth_mode": "jwt"},
        {"auth_mode": "jwt", "auth_jwt_secret": "s", "auth_jwt_public_key": "k"},
        {"auth_mode": "oauth"},
    ],
    ids=["jwt_without_key", "jwt_with_two_keys", "unknown_mode"],
)
def test_misconfigured_auth_stops_the_service_at_start(values):
    with pytest.raises(SystemExit):
        Settings(database_url="postgresql://x", page_token_key=TEST_PAGE_TOKEN_KEY, **values)


async def publish_a_completed_job(
    jobs_stub: jobs_pb2_grpc.JobServiceStub,
    jobs_service,
    settings: Settings,
    metadata: tuple[tuple[str, str], ...],
    fake_postiz,
    publish_metadata: tuple[tuple[str, str], ...] | None = None,
) -> publisher_pb2.Publication:
    """Makes a COMPLETED job as `metadata`, then PublishJob through a Publisher started with
    `settings` (as `publish_metadata`, by default the same)."""
    definition = publisher_definition(publisher_config(jobs_service))
    organization = fake_postiz.add_organization()
    fake_postiz.files["signed.mp4"] = b"\x00\x00\x00\x18ftypmp42" + bytes(100)
    job = await jobs_stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="video_render")), metadata=metadata
    )
    done = jobs_pb2.Job(job_id=job.job_id, status=jobs_pb2.COMPLETED)
    done.result.update({"video_url": f"{fake_postiz.base_url}/files/signed.mp4"})
    await jobs_stub.UpdateJob(
        jobs_pb2.UpdateJobRequest(
            job=done, update_mask=field_mask_pb2.FieldMask(paths=["status", "result"])
        ),
        metadata=metadata,
    )
    async with (
        running(definition, settings) as publisher,
        grpc.aio.insecure_channel(f"127.0.0.1:{publisher.port}") as channel,
    ):
        stub = publisher_pb2_grpc.PublisherServiceStub(channel)
        await stub.SetPostizCredentials(
            publisher_pb2.SetPostizCredentialsRequest(
                base_url=api_root(fake_postiz), api_key=organization.api_key
            ),
            metadata=metadata,
        )
        return await stub.PublishJob(
            publisher_pb2.PublishJobRequest(
                job_id=job.job_id,
                integration_ids=[organization.integrations[0]["id"]],
                content="Signed and delivered",
            ),
            metadata=publish_metadata or metadata,
        )


async def test_publish_job_reaches_the_jobs_service_with_the_callers_token(
    database_url, jwt_jobs_service, jwt_jobs_stub, fake_postiz
):
    """Both services in AUTH_MODE=jwt: the Publisher reads and writes the job as the caller."""
    settings = settings_for(database_url, auth_mode="jwt", auth_jwt_secret=TEST_JWT_SECRET)
    profile_id = new_profile_id()
    metadata = signed_in(profile_id)
    publication = await publish_a_completed_job(
        jwt_jobs_stub, jwt_jobs_service, settings, metadata, fake_postiz
    )
    assert publication.state == publisher_pb2.PUBLICATION_STATE_ACCEPTED
    written = await jwt_jobs_stub.GetJob(
        jobs_pb2.GetJobRequest(job_id=publication.job_id), metadata=metadata
    )
    assert written.result["publication"]["request_id"] == f"job:{publication.job_id}"


def test_es256_public_key_may_be_given_as_pem_text(es256_keys):
    settings = Settings(
        database_url="postgresql://x",
        auth_mode="jwt",
        auth_jwt_public_key=es256_keys[1],
        page_token_key=TEST_PAGE_TOKEN_KEY,
    )
    token = mint_token(es256_keys[0], sub="svc", profiles=["p"], algorithm="ES256")
    assert JwtAuthorizer.from_settings(settings).claims(token)["sub"] == "svc"


async def test_mint_command_signs_es256_with_a_private_key_file(es256_jobs, es256_keys, tmp_path):
    key_file = tmp_path / "private.pem"
    key_file.write_text(es256_keys[0])
    profile_id = new_profile_id()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.runtime.auth",
        "mint",
        "--sub",
        "ops",
        "--profiles",
        profile_id,
        "--private-key",
        str(key_file),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0
    error = await status_of(get_job(es256_jobs, signed_in(profile_id, out.decode().strip())))
    assert error.code() == Code.NOT_FOUND


# ES256 with what the manifests set: a key set (two kids during a rotation), an audience, an
# issuer and a maximum lifetime.
ISSUER = "test-issuer"
JOBS_AUDIENCE = "jobs.v1.JobService"
PUBLISHER_AUDIENCE = "publisher.v1.PublisherService"
MAX_LIFETIME = 3600


@pytest.fixture(scope="module")
def rotating_keys(tmp_path_factory) -> dict[str, str]:
    """Two private keys by kid, "old" and "new", as files; and their JWK set."""
    folder = tmp_path_factory.mktemp("rotating")
    keys = {}
    for kid in ("old", "new"):
        keys[kid] = _es256_keys()[0]
        (folder / f"{kid}.pem").write_text(keys[kid])
    jwks = subprocess_output("jwks", *(f"{kid}={folder / f'{kid}.pem'}" for kid in ("old", "new")))
    return keys | {"jwks": jwks}


def subprocess_output(*args: str) -> str:
    completed = subprocess.run(
        [sys.executable, "-m", "services.runtime.auth", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return completed.stdout


def es256_settings(database_url: str, jwks: str, audience: str) -> Settings:
    return settings_for(
        database_url,
        auth_mode="jwt",
        auth_jwt_public_key=jwks,
        auth_jwt_audience=audience,
        auth_jwt_issuer=ISSUER,
        auth_jwt_max_lifetime_seconds=MAX_LIFETIME,
    )


@pytest.fixture(scope="module")
async def strict_jobs_service(database_url, rotating_keys):
    async with running(
        JOBS, es256_settings(database_url, rotating_keys["jwks"], JOBS_AUDIENCE)
    ) as s:
        yield s


@pytest.fixture(scope="module")
async def strict_jobs(strict_jobs_service):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{strict_jobs_service.port}") as channel:
        yield jobs_pb2_grpc.JobServiceStub(channel)


def strict_token(rotating_keys, profile_id: str, kid: str = "new", **changes: object) -> str:
    """A token as the manifests expect it, with `changes` to its options."""
    options: dict = {
        "sub": "svc",
        "profiles": [profile_id],
        "algorithm": "ES256",
        "key_id": kid,
        "audience": [JOBS_AUDIENCE],
        "issuer": ISSUER,
        "ttl_seconds": 600,
    }
    return mint_token(rotating_keys[kid], **(options | changes))


@pytest.mark.parametrize("kid", ["old", "new"])
async def test_during_a_rotation_tokens_of_either_key_of_the_set_are_accepted(
    strict_jobs, rotating_keys, kid
):
    profile_id = new_profile_id()
    token = strict_token(rotating_keys, profile_id, kid)
    error = await status_of(get_job(strict_jobs, signed_in(profile_id, token)))
    assert error.code() == Code.NOT_FOUND


async def test_token_whose_aud_lists_this_service_among_others_is_accepted(
    strict_jobs, rotating_keys
):
    profile_id = new_profile_id()
    token = strict_token(rotating_keys, profile_id, audience=[PUBLISHER_AUDIENCE, JOBS_AUDIENCE])
    error = await status_of(get_job(strict_jobs, signed_in(profile_id, token)))
    assert error.code() == Code.NOT_FOUND


def _without_iat(keys: dict[str, str], profile_id: str) -> str:
    claims = jwt.decode(strict_token(keys, profile_id), options={"verify_signature": False})
    del claims["iat"]
    return jwt.encode(claims, keys["new"], algorithm="ES256", headers={"kid": "new"})


STRICT_BAD_TOKENS = {
    "for_another_service": (
        lambda keys, p: strict_token(keys, p, audience=["costs.v1.CostService"]),
        "aud",
    ),
    "without_aud": (lambda keys, p: strict_token(keys, p, audience=[]), "aud"),
    "from_another_issuer": (lambda keys, p: strict_token(keys, p, issuer="someone-else"), "iss"),
    "without_iss": (lambda keys, p: strict_token(keys, p, issuer=None), "iss"),
    "living_too_long": (
        lambda keys, p: strict_token(keys, p, ttl_seconds=MAX_LIFETIME + 60),
        "AUTH_JWT_MAX_LIFETIME_SECONDS",
    ),
    "without_iat": (_without_iat, "iat"),
    "with_iat_as_text": (
        lambda keys, p: strict_token(keys, p, extra_claims={"iat": str(int(time.time()))}),
        "iat",
    ),
    "of_a_kid_outside_the_set": (lambda keys, p: strict_token(keys, p, key_id="retired"), "kid"),
}


@pytest.mark.parametrize(
    ("make_token", "named"), STRICT_BAD_TOKENS.values(), ids=STRICT_BAD_TOKENS.keys()
)
async def test_token_not_meant_for_this_service_or_too_long_lived_is_unauthenticated(
    strict_jobs, rotating_keys, make_token, named
):
    profile_id = new_profile_id()
    token = make_token(rotating_keys, profile_id)
    error = await status_of(get_job(strict_jobs, signed_in(profile_id, token)))
    assert error.code() == Code.UNAUTHENTICATED
    assert named in error.details()


async def test_es256_publish_job_reaches_jobs_with_a_token_naming_both_services(
    database_url, strict_jobs_service, strict_jobs, rotating_keys, fake_postiz
):
    """The Publisher calls Jobs with the caller's own token: its aud names both."""
    profile_id = new_profile_id()
    both = strict_token(rotating_keys, profile_id, audience=[PUBLISHER_AUDIENCE, JOBS_AUDIENCE])
    settings = es256_settings(database_url, rotating_keys["jwks"], PUBLISHER_AUDIENCE)
    publication = await publish_a_completed_job(
        strict_jobs, strict_jobs_service, settings, signed_in(profile_id, both), fake_postiz
    )
    assert publication.state == publisher_pb2.PUBLICATION_STATE_ACCEPTED


async def test_es256_publish_job_with_a_token_for_the_publisher_only_is_unauthenticated(
    database_url, strict_jobs_service, strict_jobs, rotating_keys, fake_postiz
):
    profile_id = new_profile_id()
    both = strict_token(rotating_keys, profile_id, audience=[PUBLISHER_AUDIENCE, JOBS_AUDIENCE])
    publisher_only = strict_token(rotating_keys, profile_id, audience=[PUBLISHER_AUDIENCE])
    settings = es256_settings(database_url, rotating_keys["jwks"], PUBLISHER_AUDIENCE)
    error = await status_of(
        publish_a_completed_job(
            strict_jobs,
            strict_jobs_service,
            settings,
            signed_in(profile_id, both),
            fake_postiz,
            publish_metadata=signed_in(profile_id, publisher_only),
        )
    )
    assert error.code() == Code.UNAUTHENTICATED
    assert JOBS_AUDIENCE in error.details()


@pytest.mark.parametrize("form", ["pem", "jwk_set"])
def test_a_private_key_given_as_the_public_key_stops_the_service_at_start(es256_keys, form):
    private_pem = es256_keys[0]
    if form == "jwk_set":
        private = serialization.load_pem_private_key(private_pem.encode(), password=None)
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(private, as_dict=True)
        value = json.dumps({"keys": [jwk | {"kid": "k"}]})
    else:
        value = private_pem
    settings = Settings(
        database_url="postgresql://x",
        auth_mode="jwt",
        auth_jwt_public_key=value,
        page_token_key=TEST_PAGE_TOKEN_KEY,
    )
    with pytest.raises(SystemExit, match="public"):
        JwtAuthorizer.from_settings(settings)


async def test_mint_command_names_the_kid_audiences_and_issuer(
    strict_jobs, rotating_keys, tmp_path
):
    key_file = tmp_path / "new.pem"
    key_file.write_text(rotating_keys["new"])
    profile_id = new_profile_id()
    token = subprocess_output(
        "mint",
        "--private-key",
        str(key_file),
        "--kid",
        "new",
        "--aud",
        f"{PUBLISHER_AUDIENCE},{JOBS_AUDIENCE}",
        "--iss",
        ISSUER,
        "--sub",
        "ops",
        "--profiles",
        profile_id,
    ).strip()
    error = await status_of(get_job(strict_jobs, signed_in(profile_id, token)))
    assert error.code() == Code.NOT_FOUND


def test_keygen_writes_a_private_key_only_its_owner_may_read(tmp_path):
    path = tmp_path / "key.pem"
    subprocess_output("keygen", str(path))
    assert path.stat().st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" in path.read_text()
