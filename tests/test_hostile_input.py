"""Hostile input, one property test per RPC: random field values (huge strings, control
characters, SQL fragments, extreme numbers, deep or huge Structs, odd enum values, random
profile ids and metadata). Every reply is OK or a deliberate status, never UNKNOWN or INTERNAL;
a refused call changes nothing in the database.

Adding a service: one `FuzzTarget` fixture and one three-line test like those below.
"""

import base64
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from costs.v1 import costs_pb2
from google.protobuf import descriptor
from hypothesis import strategies as st
from jobs.v1 import jobs_pb2
from publisher.v1 import publisher_pb2

from services.publisher.fake_postiz import api_root
from tests.conftest import as_profile, connect_profile, new_profile_id
from tests.hostile import (
    CLIENT_LOST_THE_STATUS,
    DELIBERATE,
    AccessLines,
    call_status,
    extra_metadata,
    hostile_decimals,
    messages,
    metadata_text,
    profile_ids,
    profile_rows,
    run_property,
)

FUZZ_RUN = uuid.uuid4().hex[:8]


@dataclass
class FuzzTarget:
    """One service under fuzzing: its stub, schema, and a profile with some state."""

    stub: Any
    service: descriptor.ServiceDescriptor
    schema: str
    profile_id: str
    plausible: Mapping[str, st.SearchStrategy[Any]]
    # Replies that relay a third party's answer may record the attempt (exactly-once).
    third_party: str | None = None

    def method(self, name: str) -> descriptor.MethodDescriptor:
        return self.service.methods_by_name[name]


@pytest.fixture(scope="module")
async def admin(database_url):
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


@pytest.fixture(scope="module")
async def jobs_target(jobs_stub) -> FuzzTarget:
    profile_id = new_profile_id()
    job = await jobs_stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="video_render")),
        metadata=as_profile(profile_id),
    )
    return FuzzTarget(
        stub=jobs_stub,
        service=jobs_pb2.DESCRIPTOR.services_by_name["JobService"],
        schema="jobs",
        profile_id=profile_id,
        plausible={
            "job_id": st.sampled_from([job.job_id, str(uuid.uuid4())]),
            # Kinds of this run's own: LeaseJobs leases any profile's jobs of a kind.
            "kind": st.sampled_from([f"fuzz-render-{FUZZ_RUN}", f"fuzz-thumbnail-{FUZZ_RUN}"]),
            "paths": st.sampled_from(["status", "progress", "message", "data", "result"]),
            "etag": st.sampled_from(["", "1", job.etag]),
            "request_id": st.sampled_from(["r-1", "r-2"]),
        },
    )


@pytest.fixture(scope="module")
async def publisher_target(publisher_stub, jobs_stub, fake_postiz) -> FuzzTarget:
    connected = await connect_profile(publisher_stub, fake_postiz)
    profile_id = dict(connected.metadata)["x-profile-id"]
    fake_postiz.files["fuzz.mp4"] = b"\x00\x00\x00\x18ftypmp42" + bytes(100)
    job = await jobs_stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="video_render")),
        metadata=connected.metadata,
    )
    integration_ids = [i["id"] for i in connected.organization.integrations]
    return FuzzTarget(
        stub=publisher_stub,
        service=publisher_pb2.DESCRIPTOR.services_by_name["PublisherService"],
        schema="publisher",
        profile_id=profile_id,
        plausible={
            "base_url": st.just(api_root(fake_postiz)),
            "api_key": st.just(connected.organization.api_key),
            "job_id": st.sampled_from([job.job_id, str(uuid.uuid4())]),
            "integration_id": st.sampled_from(integration_ids),
            "integration_ids": st.sampled_from(integration_ids),
            "content": st.sampled_from(["A new video is out", "Watch this"]),
            "request_id": st.sampled_from(["post-1", "post-2"]),
            "url": st.just(f"{fake_postiz.base_url}/files/fuzz.mp4"),
            "filename": st.sampled_from(["clip.mp4", "a.png"]),
            "content_type": st.sampled_from(["video/mp4", "image/png"]),
            "size_bytes": st.integers(0, 2_000),
            "post_id": st.sampled_from(["nope", str(uuid.uuid4())]),
        },
        third_party="Postiz",
    )


@pytest.fixture(scope="module")
async def costs_target(costs_stub) -> FuzzTarget:
    profile_id = new_profile_id()
    await costs_stub.RecordElevenLabsTTS(
        costs_pb2.RecordElevenLabsTTSRequest(
            request_id="seed", model_id="eleven_flash_v2_5", characters=1000
        ),
        metadata=as_profile(profile_id),
    )
    return FuzzTarget(
        stub=costs_stub,
        service=costs_pb2.DESCRIPTOR.services_by_name["CostService"],
        schema="costs",
        profile_id=profile_id,
        plausible={
            "request_id": st.sampled_from(["seed", "r-1", "r-2"]),
            "model_id": st.sampled_from(["eleven_flash_v2_5", "eleven_v3", "unknown-model"]),
            "model": st.sampled_from(["gemini-2.5-pro", "gemini-2.5-flash", "unknown-model"]),
            "provider": st.sampled_from(["elevenlabs", "gemini", "acme"]),
            "unit": st.sampled_from(["characters", "seconds"]),
            "quantity": st.one_of(
                st.sampled_from(["1", "0.5", "-1", "1e400", "NaN", "12.345"]), hostile_decimals
            ),
            "limit_usd": st.one_of(
                st.sampled_from(["50", "0", "-1", "0.000000001", "1e30"]), hostile_decimals
            ),
            "estimated_cost_usd": st.one_of(
                st.sampled_from(["1.25", "0", "-3", "abc"]), hostile_decimals
            ),
            "job_id": st.sampled_from([str(uuid.uuid4()), "not-a-uuid"]),
        },
    )


# A refused StreamUsage keeps the lines before the bad one, and says how many it kept.
_RECORDED_BEFORE = re.compile(r"the [1-9][0-9]* line\(s\) before it are recorded$")


def _request(target: FuzzTarget, method: descriptor.MethodDescriptor) -> st.SearchStrategy:
    one = messages(method.input_type._concrete_class, target.plausible)
    return st.lists(one, max_size=4) if method.client_streaming else one


async def fuzz(target: FuzzTarget, admin: asyncpg.Connection, rpc: str) -> None:
    method = target.method(rpc)
    # A stream (WatchJob) may rightly outlive the test's deadline; a unary call may not.
    allowed = DELIBERATE | (
        {grpc.StatusCode.DEADLINE_EXCEEDED} if method.server_streaming else set()
    )
    deadline_seconds = 3 if method.server_streaming else 10

    full_name = f"/{method.containing_service.full_name}/{method.name}"

    async def check(request: Any, profile_id: str, extra: list[tuple[str, str]]) -> None:
        metadata = (*as_profile(profile_id), *extra)
        watched = profile_id or target.profile_id
        before = await profile_rows(admin, target.schema, watched)
        logged = len(access.records)
        code, details = await call_status(target.stub, method, request, metadata, deadline_seconds)
        if (
            method.client_streaming
            and code == grpc.StatusCode.INTERNAL
            and details == CLIENT_LOST_THE_STATUS
        ):
            code = access.server_status(logged, full_name)  # judge what the server answered
        relayed = bool(target.third_party) and target.third_party in details
        assert code in allowed or (code == grpc.StatusCode.UNAVAILABLE and relayed), (
            f"{rpc} answered {code.name}: {details}"
        )
        if code != grpc.StatusCode.OK and not relayed and not _RECORDED_BEFORE.search(details):
            after = await profile_rows(admin, target.schema, watched)
            assert after == before, f"{rpc} answered {code.name} ({details}) yet wrote"

    with AccessLines() as access:
        await run_property(
            check,
            request=_request(target, method),
            profile_id=st.one_of(
                st.just(target.profile_id), st.just(target.profile_id), profile_ids
            ),
            extra=extra_metadata,
        )


def _rpcs(service: descriptor.ServiceDescriptor) -> list[str]:
    return [method.name for method in service.methods]


@pytest.mark.parametrize("rpc", _rpcs(jobs_pb2.DESCRIPTOR.services_by_name["JobService"]))
async def test_jobs_rpc_answers_hostile_input_deliberately(jobs_target, admin, rpc):
    await fuzz(jobs_target, admin, rpc)


@pytest.mark.parametrize(
    "rpc", _rpcs(publisher_pb2.DESCRIPTOR.services_by_name["PublisherService"])
)
async def test_publisher_rpc_answers_hostile_input_deliberately(publisher_target, admin, rpc):
    await fuzz(publisher_target, admin, rpc)


@pytest.mark.parametrize("rpc", _rpcs(costs_pb2.DESCRIPTOR.services_by_name["CostService"]))
async def test_costs_rpc_answers_hostile_input_deliberately(costs_target, admin, rpc):
    await fuzz(costs_target, admin, rpc)


def _forged_jwt(header: str, body: str, signature: str) -> str:
    def part(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    return f"{part(header)}.{part(body)}.{part(signature)}"


async def test_random_authorization_is_refused_deliberately(jwt_jobs_stub):
    method = jobs_pb2.DESCRIPTOR.services_by_name["JobService"].methods_by_name["GetJob"]
    request = jobs_pb2.GetJobRequest(job_id=str(uuid.uuid4()))

    async def check(authorization: str, profile_id: str) -> None:
        metadata = (*as_profile(profile_id), ("authorization", authorization))
        code, details = await call_status(jwt_jobs_stub, method, request, metadata, 3)
        assert code in {
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.INVALID_ARGUMENT,
        }, f"{code.name}: {details}"

    await run_property(
        check,
        authorization=st.one_of(
            metadata_text,
            metadata_text.map(lambda text: f"Bearer {text}"),
            st.builds(
                _forged_jwt,
                st.sampled_from(['{"alg":"none"}', '{"alg":"HS256"}', '{"alg":"ES256"}', "[]"]),
                st.one_of(metadata_text, st.just('{"sub":"x","profiles":["p"],"exp":9e99}')),
                metadata_text,
            ).map(lambda token: f"Bearer {token}"),
        ),
        profile_id=profile_ids,
    )
