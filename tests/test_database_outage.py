"""When Postgres goes away: clear UNAVAILABLE, counted as a Postgres connection error, health
NOT_SERVING, and recovery by itself."""

import asyncio

import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from services.jobs.service import JOBS
from tests.conftest import as_profile, new_profile_id, running, settings_for
from tests.metrics_scrape import sample, scrape

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _health_becomes(updates, status: int) -> None:
    while (await asyncio.wait_for(updates.read(), 20)).status != status:
        pass


async def test_outage_gives_unavailable_and_recovers_without_restart(disposable_postgres):
    profile = as_profile(new_profile_id())
    settings = settings_for(disposable_postgres.url, health_check_interval_seconds=0.1)
    async with (
        running(JOBS, settings) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        job = await stub.CreateJob(
            jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k")), metadata=profile
        )
        watch = stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=profile)
        await watch.read()
        health = health_pb2_grpc.HealthStub(channel)
        updates = health.Watch(health_pb2.HealthCheckRequest(service="jobs.v1.JobService"))
        await _health_becomes(updates, SERVING)

        await asyncio.to_thread(disposable_postgres.stop)
        await _health_becomes(updates, NOT_SERVING)
        errors = {"service": "jobs", "kind": "connection"}
        errors_before = sample(await scrape(service), "postgres_errors_total", **errors)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=profile)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "retry" in raised.value.details()
        alive = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert alive.status == SERVING  # liveness: not restarted for the database's outage
        assert sample(await scrape(service), "postgres_errors_total", **errors) == errors_before + 1

        await asyncio.to_thread(disposable_postgres.start)
        await _health_becomes(updates, SERVING)
        await stub.UpdateJob(
            jobs_pb2.UpdateJobRequest(
                job=jobs_pb2.Job(job_id=job.job_id, progress=42),
                update_mask=field_mask_pb2.FieldMask(paths=["progress"]),
            ),
            metadata=profile,
        )
        assert (await asyncio.wait_for(watch.read(), 20)).progress == 42
        updates.cancel()
        watch.cancel()
