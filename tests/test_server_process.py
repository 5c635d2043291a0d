"""The Jobs server as an operator runs it: its own process, grpcurl, health and SIGTERM."""

import asyncio
import json
import shutil
import sys
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from tests.conftest import as_profile, new_profile_id, server_process

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


async def grpcurl(port: int, *command: str, flags: tuple[str, ...] = ()) -> str:
    process = await asyncio.create_subprocess_exec(
        GRPCURL,
        "-plaintext",
        *flags,
        f"127.0.0.1:{port}",
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    return out.decode()


@pytest.fixture(scope="module")
async def jobs_process(database_url):
    async with server_process("jobs", database_url) as server:
        yield server


async def test_grpcurl_lists_the_services(jobs_process):
    listed = (await grpcurl(jobs_process.port, "list")).split()
    assert {"jobs.v1.JobService", "grpc.health.v1.Health"} <= set(listed)


async def test_grpcurl_describes_the_job_service(jobs_process):
    described = await grpcurl(jobs_process.port, "describe", "jobs.v1.JobService")
    for rpc in ("CreateJob", "GetJob", "UpdateJob", "ListJobs", "CancelJob", "DeleteJob"):
        assert f"rpc {rpc}" in described
    assert "rpc WatchJob ( .jobs.v1.WatchJobRequest ) returns ( stream .jobs.v1.Job )" in described


async def test_grpcurl_creates_and_gets_a_job(jobs_process):
    header = f"x-profile-id: {new_profile_id()}"
    body = json.dumps({"job": {"kind": "video_render", "data": {"product": "sku-1"}}})
    created = json.loads(
        await grpcurl(
            jobs_process.port, "jobs.v1.JobService/CreateJob", flags=("-H", header, "-d", body)
        )
    )
    assert created["status"] == "PENDING"
    fetched = json.loads(
        await grpcurl(
            jobs_process.port,
            "jobs.v1.JobService/GetJob",
            flags=("-H", header, "-d", json.dumps({"job_id": created["job_id"]})),
        )
    )
    assert fetched["job_id"] == created["job_id"]
    assert fetched["data"] == {"product": "sku-1"}


async def _locked_row(database_url: str, job_id: str) -> asyncpg.Connection:
    """A connection holding the job's row lock, so an UpdateJob waits on it."""
    connection = await asyncpg.connect(database_url)
    await connection.execute("BEGIN")
    await connection.execute("SELECT 1 FROM jobs.jobs WHERE job_id = $1 FOR UPDATE", job_id)
    return connection


async def _wait_for_lock_waiter(connection: asyncpg.Connection) -> None:
    for _ in range(200):
        waiting = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        if waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the UpdateJob never reached the database")


async def test_call_in_flight_when_sigterm_arrives_completes(database_url):
    profile = as_profile(new_profile_id())
    async with (
        server_process("jobs", database_url, SHUTDOWN_GRACE_SECONDS="20") as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        job = await stub.CreateJob(
            jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k")), metadata=profile
        )
        health_updates = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await health_updates.read()).status == health_pb2.HealthCheckResponse.SERVING
        lock = await _locked_row(database_url, job.job_id)
        update = asyncio.ensure_future(
            stub.UpdateJob(
                jobs_pb2.UpdateJobRequest(
                    job=jobs_pb2.Job(job_id=job.job_id, progress=50),
                    update_mask=field_mask_pb2.FieldMask(paths=["progress"]),
                ),
                metadata=profile,
            )
        )
        await _wait_for_lock_waiter(lock)
        server.process.terminate()
        reply = await asyncio.wait_for(health_updates.read(), 10)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        health_updates.cancel()  # a stream still open would hold the drain for the full grace
        await lock.execute("COMMIT")
        await lock.close()
        assert (await asyncio.wait_for(update, 10)).progress == 50
        assert await asyncio.wait_for(server.process.wait(), 30) == 0
