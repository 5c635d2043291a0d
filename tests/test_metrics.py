"""Prometheus metrics, scraped over HTTP from the running services as calls are made."""

import re
import socket
import uuid

import grpc
import httpx
import pytest
from costs.v1 import costs_pb2
from jobs.v1 import jobs_pb2, jobs_pb2_grpc
from publisher.v1 import publisher_pb2

from services.runtime.settings import Settings
from tests.conftest import (
    TEST_POSTS_PER_HOUR,
    as_profile,
    new_profile_id,
    record_tts,
    server_process,
)
from tests.metrics_scrape import sample, scrape
from tests.publisher_requests import expect_status, post_request

Code = grpc.StatusCode
GET_JOB = {"grpc_service": "jobs.v1.JobService", "grpc_method": "GetJob", "grpc_type": "unary"}


async def _get_missing_job(jobs_stub, metadata) -> None:
    with pytest.raises(grpc.aio.AioRpcError):
        await jobs_stub.GetJob(jobs_pb2.GetJobRequest(job_id=str(uuid.uuid4())), metadata=metadata)


async def test_handled_total_counts_calls_by_method_and_status_code(jobs_service, jobs_stub):
    before = await scrape(jobs_service)
    profile = as_profile(new_profile_id())
    job = await jobs_stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k")), metadata=profile
    )
    await jobs_stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=profile)
    await _get_missing_job(jobs_stub, profile)
    await _get_missing_job(jobs_stub, profile)
    after = await scrape(jobs_service)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("grpc_server_handled_total", **GET_JOB, grpc_code="OK") == 1
    assert delta("grpc_server_handled_total", **GET_JOB, grpc_code="NOT_FOUND") == 2
    assert delta("grpc_server_started_total", **GET_JOB) == 3
    assert delta("grpc_server_handling_seconds_count", **GET_JOB) == 3
    assert delta("grpc_server_handling_seconds_bucket", **GET_JOB, le="+Inf") == 3
    assert delta("grpc_server_handled_total", grpc_method="CreateJob", grpc_code="OK") == 1


async def test_call_refused_for_want_of_a_profile_is_counted(jobs_service, jobs_stub):
    before = await scrape(jobs_service)
    await _get_missing_job(jobs_stub, ())
    after = await scrape(jobs_service)
    labels = {**GET_JOB, "grpc_code": "UNAUTHENTICATED"}
    assert sample(after, "grpc_server_handled_total", **labels) == (
        sample(before, "grpc_server_handled_total", **labels) + 1
    )


async def test_streaming_calls_are_counted_with_their_type(jobs_service, jobs_stub):
    profile = as_profile(new_profile_id())
    job = await jobs_stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k")), metadata=profile
    )
    await jobs_stub.UpdateJob(
        jobs_pb2.UpdateJobRequest(
            job=jobs_pb2.Job(job_id=job.job_id, status=jobs_pb2.CANCELLED),
            update_mask={"paths": ["status"]},
        ),
        metadata=profile,
    )
    watch = jobs_stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=profile)
    async for _ in watch:
        pass
    text = await scrape(jobs_service)
    labels = {"grpc_method": "WatchJob", "grpc_type": "server_stream", "grpc_code": "OK"}
    assert sample(text, "grpc_server_handled_total", **labels) >= 1


async def test_no_profile_id_ever_appears_in_the_metrics(jobs_service, jobs_stub):
    profile_id = new_profile_id()
    await _get_missing_job(jobs_stub, as_profile(profile_id))
    assert profile_id not in await scrape(jobs_service)


async def test_pool_gauges_show_the_pools_bounds_and_use(jobs_service, jobs_stub):
    text = await scrape(jobs_service)
    pool = {"service": "jobs"}
    # One process may hold several Jobs pools in this test session; their gauges add up.
    assert sample(text, "db_pool_connections_max", **pool) >= jobs_service.settings.db_pool_max_size
    in_use = sample(text, "db_pool_connections_in_use", **pool)
    idle = sample(text, "db_pool_connections_idle", **pool)
    assert in_use >= 0
    assert in_use + idle >= 1
    assert sample(text, "db_pool_acquire_waiting", **pool) == 0


async def test_postiz_requests_are_counted_by_endpoint_and_status(
    publisher_service, publisher_stub, postiz_profile
):
    labels = {"method": "GET", "endpoint": "/integrations", "status": "200"}
    before = sample(await scrape(publisher_service), "postiz_requests_total", **labels)
    await publisher_stub.ListIntegrations(
        publisher_pb2.ListIntegrationsRequest(), metadata=postiz_profile.metadata
    )
    after = sample(await scrape(publisher_service), "postiz_requests_total", **labels)
    assert after == before + 1


async def test_postiz_429_is_counted_as_a_rate_limit_refusal(
    publisher_service, publisher_stub, fake_postiz, postiz_profile
):
    before = await scrape(publisher_service)
    fake_postiz.answer_once(postiz_profile.organization, "POST", "/posts", 429, {}, {})
    await expect_status(
        publisher_stub.CreatePost(post_request(postiz_profile), metadata=postiz_profile.metadata),
        Code.RESOURCE_EXHAUSTED,
    )
    after = await scrape(publisher_service)
    for name, labels in [
        ("publisher_rate_limit_refusals_total", {"reason": "postiz_429"}),
        ("postiz_requests_total", {"method": "POST", "endpoint": "/posts", "status": "429"}),
    ]:
        assert sample(after, name, **labels) == sample(before, name, **labels) + 1


async def test_spent_posting_budget_is_counted_as_a_rate_limit_refusal(
    publisher_service, publisher_stub, postiz_profile
):
    for _ in range(TEST_POSTS_PER_HOUR):
        await publisher_stub.CreatePost(
            post_request(postiz_profile), metadata=postiz_profile.metadata
        )
    name, labels = "publisher_rate_limit_refusals_total", {"reason": "posts_per_hour"}
    before = sample(await scrape(publisher_service), name, **labels)
    await expect_status(
        publisher_stub.CreatePost(post_request(postiz_profile), metadata=postiz_profile.metadata),
        Code.RESOURCE_EXHAUSTED,
    )
    after = sample(await scrape(publisher_service), name, **labels)
    assert after == before + 1


@pytest.mark.parametrize(
    ("raw", "port"), [(None, 9091), ("9500", 9500), ("0", 0), ("", None), ("off", None)]
)
def test_metrics_port_defaults_per_service_and_can_be_switched_off(monkeypatch, raw, port):
    monkeypatch.setenv("DATABASE_URL", "postgresql://unused")
    if raw is None:
        monkeypatch.delenv("METRICS_PORT", raising=False)
    else:
        monkeypatch.setenv("METRICS_PORT", raw)
    assert Settings.from_environment(50051, 9091).metrics_port == port


async def test_service_process_serves_metrics_on_the_port_it_logs(database_url):
    async with server_process("jobs", database_url) as server:
        logged = next(
            match
            for line in server.output
            if (match := re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", line))
        )
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{logged.group(1)}/metrics")
        assert "grpc_server_handled_total" in response.text
        assert await server.terminate() == 0


def _free_ports(count: int) -> list[int]:
    """Distinct ports free now: each probe stays bound until all are picked."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


async def test_workers_sharing_a_port_are_counted_together_on_one_metrics_port(database_url):
    grpc_port, metrics_port = _free_ports(2)
    async with server_process(
        "jobs",
        database_url,
        GRPC_PORT=str(grpc_port),
        GRPC_WORKERS="2",
        METRICS_PORT=str(metrics_port),
    ) as server:
        for _ in range(4):
            # A channel of its own per call: new connections spread over the workers.
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{server.port}", options=[("grpc.use_local_subchannel_pool", 1)]
            ) as channel:
                await _get_missing_job(jobs_pb2_grpc.JobServiceStub(channel), as_profile("store-1"))
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        assert server.port == grpc_port
        # (A worker still starting when SIGTERM comes makes the exit status 1: not the point.)
        await server.terminate()
    labels = {**GET_JOB, "grpc_code": "NOT_FOUND"}
    assert sample(text, "grpc_server_handled_total", **labels) == 4


async def test_costs_lines_are_counted_by_outcome(costs_service, costs_stub):
    profile = as_profile(new_profile_id())

    async def counts() -> dict[str, float]:
        text = await scrape(costs_service)
        return {
            outcome: sample(text, "costs_lines_recorded_total", outcome=outcome)
            for outcome in ("stored", "duplicate")
        }

    before = await counts()
    await record_tts(costs_stub, profile, request_id="once")
    await costs_stub.RecordElevenLabsTTS(
        costs_pb2.RecordElevenLabsTTSRequest(
            request_id="once", model_id="eleven_flash_v2_5", characters=1
        ),
        metadata=profile,
    )
    lines = [
        costs_pb2.UsageLine(
            elevenlabs_tts=costs_pb2.RecordElevenLabsTTSRequest(
                request_id=f"batch-{n}", model_id="eleven_flash_v2_5", characters=1
            )
        )
        for n in range(3)
    ]
    await costs_stub.StreamUsage(
        iter([costs_pb2.StreamUsageRequest(lines=lines)]), metadata=profile
    )
    after = await counts()
    assert after["stored"] - before["stored"] == 4
    assert after["duplicate"] - before["duplicate"] == 1
