"""The pipeline as it runs in production (AUTH_MODE=jwt, two Jobs replicas): a store makes a
job; the example worker (examples/pipeline_worker.py, a process of its own on a worker token)
leases it, meters ElevenLabs and Gemini through the real SDKs against loopback fakes, and
completes it with its video; PublishJob posts it once to the fake Postiz; the store's costs
add up exactly. Then a worker is killed in the middle of a job: its lease expires, another
worker finishes the job, and no cost line or post counts twice."""

import asyncio
import dataclasses
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
from costs.v1 import costs_pb2, costs_pb2_grpc
from google.protobuf import timestamp_pb2
from jobs.v1 import jobs_pb2, jobs_pb2_grpc
from publisher.v1 import publisher_pb2, publisher_pb2_grpc

from services.costs.service import costs_definition
from services.jobs.leasing import LeasePolicy
from services.jobs.service import jobs_definition
from services.publisher.fake_postiz import FakePostiz, api_root, serve_fake_postiz
from services.publisher.service import publisher_definition
from tests.conftest import (
    REPO,
    TEST_JWT_SECRET,
    new_profile_id,
    publisher_config,
    running,
    settings_for,
    signed_in,
    token_for,
)
from tests.fake_providers import CountingServer, fake_providers

KIND = "video_render_e2e"
SCRIPT = "Meet our new spring collection, in stores now."
# What one job costs: its script at ElevenLabs' $0.0001 a character (eleven_multilingual_v2),
# and one Gemini call of the fake's usage (services/costs/prices.csv; tests/test_costs_metering
# spells it out: 500K text at $0.30, 200K cached at $0.03, 300K audio at $1.00, 400K output at
# $2.50 per million).
JOB_COST = len(SCRIPT) * Decimal("0.0001") + Decimal("1.456")
WORKER_LEASE_SECONDS = 2


@dataclass
class Suite:
    jobs: jobs_pb2_grpc.JobServiceStub
    costs: costs_pb2_grpc.CostServiceStub
    publisher: publisher_pb2_grpc.PublisherServiceStub
    jobs_target: str
    costs_target: str
    postiz: FakePostiz
    providers: CountingServer
    outbox: Path


@pytest.fixture(scope="module")
def providers() -> Iterator[CountingServer]:
    with fake_providers() as server:
        yield server


@pytest.fixture(scope="module")
async def suite(
    database_url: str, providers: CountingServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Suite]:
    settings = settings_for(database_url, auth_mode="jwt", auth_jwt_secret=TEST_JWT_SECRET)
    # Expired leases are found within 50 ms and retried after 0.2 s.
    jobs = jobs_definition(lease_policy=LeasePolicy(sweep_seconds=0.05, retry_base_seconds=0.2))
    spool = tmp_path_factory.mktemp("e2e-costs") / "spool.jsonl"
    async with (
        running(jobs, settings) as replica_a,
        running(jobs, settings) as replica_b,
        serve_fake_postiz() as postiz,
    ):
        jobs_target = f"ipv4:127.0.0.1:{replica_a.port},127.0.0.1:{replica_b.port}"
        costs = costs_definition(spool_path=spool, spool_retry_seconds=0.1, jobs_target=jobs_target)
        publisher_settings = dataclasses.replace(
            publisher_config(replica_a), jobs_target=jobs_target
        )
        async with (
            running(costs, settings) as costs_service,
            running(publisher_definition(publisher_settings), settings) as publisher,
            grpc.aio.insecure_channel(f"127.0.0.1:{replica_b.port}") as jobs_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{costs_service.port}") as costs_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{publisher.port}") as publisher_channel,
        ):
            yield Suite(
                jobs_pb2_grpc.JobServiceStub(jobs_channel),
                costs_pb2_grpc.CostServiceStub(costs_channel),
                publisher_pb2_grpc.PublisherServiceStub(publisher_channel),
                jobs_target,
                f"127.0.0.1:{costs_service.port}",
                postiz,
                providers,
                tmp_path_factory.mktemp("e2e-worker") / "outbox.jsonl",
            )


class Worker:
    """examples/pipeline_worker.py in a process of its own, on a worker token."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.events: list[dict] = []

    @classmethod
    async def start(cls, suite: Suite, jobs: int, lease_seconds: float) -> "Worker":
        provider_url = f"http://127.0.0.1:{suite.providers.server_address[1]}"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "examples.pipeline_worker",
            "--kind",
            KIND,
            "--jobs",
            str(jobs),
            "--lease-seconds",
            str(lease_seconds),
            "--media-base-url",
            f"{suite.postiz.base_url}/files",
            cwd=REPO,
            env=os.environ
            | {
                "JOBS_TARGET": suite.jobs_target,
                "COSTS_TARGET": suite.costs_target,
                "WORKER_TOKEN": token_for(worker=True),
                "ELEVENLABS_BASE_URL": provider_url,
                "GEMINI_BASE_URL": provider_url,
                "ELEVENLABS_API_KEY": "test-key",
                "GEMINI_API_KEY": "test-key",
                "METERING_OUTBOX_PATH": str(suite.outbox),
            },
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def next_event(self) -> dict:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout=30)
        assert line, f"the worker ended (exit {await self.process.wait()}) before its next step"
        self.events.append(json.loads(line))
        return self.events[-1]

    async def finished(self) -> list[dict]:
        """Every event until the worker exits, which it must do cleanly."""
        assert self.process.stdout is not None
        for line in (await asyncio.wait_for(self.process.stdout.read(), timeout=60)).splitlines():
            self.events.append(json.loads(line))
        assert await self.process.wait() == 0
        return self.events

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)


async def make_job(suite: Suite, profile_id: str) -> jobs_pb2.Job:
    job = jobs_pb2.Job(kind=KIND)
    job.data.update({"script": SCRIPT})
    made = await suite.jobs.CreateJob(
        jobs_pb2.CreateJobRequest(job=job), metadata=signed_in(profile_id)
    )
    # The render the worker points to, where the fake Postiz serves files.
    suite.postiz.files[f"{made.job_id}.mp4"] = b"\x00\x00\x00\x18ftypmp42" + bytes(1000)
    return made


async def read(suite: Suite, profile_id: str, job_id: str) -> jobs_pb2.Job:
    return await suite.jobs.GetJob(
        jobs_pb2.GetJobRequest(job_id=job_id), metadata=signed_in(profile_id)
    )


async def publish(suite: Suite, profile_id: str, job_id: str, integrations: list[str]):
    return await suite.publisher.PublishJob(
        publisher_pb2.PublishJobRequest(
            job_id=job_id, integration_ids=integrations, content="New this spring"
        ),
        metadata=signed_in(profile_id),
    )


async def total_cost(suite: Suite, profile_id: str) -> Decimal:
    start, end = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
    start.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
    end.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    summary = await suite.costs.GetCostSummary(
        costs_pb2.GetCostSummaryRequest(start_time=start, end_time=end),
        metadata=signed_in(profile_id),
    )
    assert summary.unpriced_line_count == 0
    return Decimal(summary.total_cost_usd)


async def cost_lines(suite: Suite, profile_id: str) -> list[costs_pb2.CostEntry]:
    listed = await suite.costs.ListCostEntries(
        costs_pb2.ListCostEntriesRequest(page_size=500), metadata=signed_in(profile_id)
    )
    return list(listed.entries)


async def test_a_job_goes_from_store_to_worker_to_post_and_a_killed_worker_loses_nothing(
    suite: Suite,
):
    profile_id = new_profile_id()
    organization = suite.postiz.add_organization()
    await suite.publisher.SetPostizCredentials(
        publisher_pb2.SetPostizCredentialsRequest(
            base_url=api_root(suite.postiz), api_key=organization.api_key
        ),
        metadata=signed_in(profile_id),
    )
    integrations = [integration["id"] for integration in organization.integrations]
    calls_before = suite.providers.calls

    # A job, end to end.
    first = await make_job(suite, profile_id)
    worker = await Worker.start(suite, jobs=1, lease_seconds=30)
    events = await worker.finished()
    assert [e["event"] for e in events] == ["leased", "metered", "metered", "completed"]
    done = await read(suite, profile_id, first.job_id)
    assert done.status == jobs_pb2.COMPLETED
    assert done.result["video_url"] == f"{suite.postiz.base_url}/files/{first.job_id}.mp4"
    assert [a.outcome for a in done.attempts] == ["COMPLETED"]
    posted = await publish(suite, profile_id, first.job_id, integrations)
    assert posted.state == publisher_pb2.PUBLICATION_STATE_ACCEPTED
    again = await publish(suite, profile_id, first.job_id, integrations)
    assert again.posts == posted.posts
    assert len(organization.live_posts) == len(integrations)
    assert await total_cost(suite, profile_id) == JOB_COST

    # A worker killed while its ElevenLabs call is in flight: nothing of its was recorded.
    suite.providers.gate.clear()
    second = await make_job(suite, profile_id)
    doomed = await Worker.start(suite, jobs=1, lease_seconds=WORKER_LEASE_SECONDS)
    leased = await doomed.next_event()
    assert (leased["event"], leased["job_id"]) == ("leased", second.job_id)
    doomed.kill()
    await doomed.process.wait()
    suite.providers.gate.set()
    # Its lease expires; another worker gets the job back and finishes it.
    rescuer = await Worker.start(suite, jobs=1, lease_seconds=30)
    events = await rescuer.finished()
    assert [e["event"] for e in events] == ["leased", "metered", "metered", "completed"]
    assert events[0]["job_id"] == second.job_id
    assert events[0]["attempt"] == 2
    done = await read(suite, profile_id, second.job_id)
    assert done.status == jobs_pb2.COMPLETED
    assert [a.outcome for a in done.attempts] == ["LEASE_EXPIRED", "COMPLETED"]
    await publish(suite, profile_id, second.job_id, integrations)
    await publish(suite, profile_id, second.job_id, integrations)
    assert len(organization.live_posts) == 2 * len(integrations)

    # Every provider call answered is one cost line, each once; the total is exact.
    lines = await cost_lines(suite, profile_id)
    assert len(lines) == suite.providers.calls - calls_before == 4
    assert len({line.request_id for line in lines}) == len(lines)
    assert sorted(line.job_id for line in lines) == sorted([first.job_id] * 2 + [second.job_id] * 2)
    assert await total_cost(suite, profile_id) == 2 * JOB_COST
