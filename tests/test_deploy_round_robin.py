"""The cluster, stood in for on one machine: two Jobs replicas on two loopback ports, with the
shutdown settings of their ConfigMap, behind one client channel that has both addresses (as a
headless Service's DNS answer gives them) and the service config callers use
(deploy/grpc-service-config/jobs.json). One replica is terminated mid-load, as in a rollout or
a scale-down."""

import asyncio
import signal

import asyncpg
import grpc
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from tests.conftest import as_profile, new_profile_id, server_process
from tests.kubernetes_manifests import BASE, DEPLOY, find, render

SERVICE_CONFIG = DEPLOY / "grpc-service-config/jobs.json"
CONCURRENT_CALLERS = 8
ROUNDS_BEFORE_SIGTERM = 60  # each a CreateJob with a request_id, then a GetJob of its job
ROUNDS_AFTER_EXIT = 60  # once the terminated replica has exited
MAX_ROUNDS = 3000
CALL_TIMEOUT_SECONDS = 10


def shutdown_settings() -> dict[str, str]:
    data = find(render(BASE), "ConfigMap", "jobs-config")["data"]
    shutdown = {name: value for name, value in data.items() if name.startswith("SHUTDOWN_")}
    return shutdown | {"ACCESS_LOG": "all"}  # the test counts each replica's OK calls


def served(output: list[str], method: str) -> int:
    """How many calls of `method` a replica's access log shows finished OK."""
    return sum(f"jobs.v1.JobService/{method} OK" in line for line in output)


async def test_every_call_succeeds_while_one_replica_drains(database_url):
    profile_id = new_profile_id()
    metadata = as_profile(profile_id)
    options = [("grpc.service_config", SERVICE_CONFIG.read_text())]
    job_ids: dict[str, str] = {}
    sigterm_due = asyncio.Event()
    stop_at = MAX_ROUNDS

    async with (
        server_process("jobs", database_url, **shutdown_settings()) as draining,
        server_process("jobs", database_url, **shutdown_settings()) as staying,
    ):
        target = f"ipv4:127.0.0.1:{draining.port},127.0.0.1:{staying.port}"
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            stub = jobs_pb2_grpc.JobServiceStub(channel)
            rounds = iter(range(MAX_ROUNDS))

            async def caller() -> None:
                for number in rounds:
                    request_id = f"round-{number}"
                    job = await stub.CreateJob(
                        jobs_pb2.CreateJobRequest(
                            job=jobs_pb2.Job(kind="video_render"), request_id=request_id
                        ),
                        metadata=metadata,
                        timeout=CALL_TIMEOUT_SECONDS,
                    )
                    fetched = await stub.GetJob(
                        jobs_pb2.GetJobRequest(job_id=job.job_id),
                        metadata=metadata,
                        timeout=CALL_TIMEOUT_SECONDS,
                    )
                    assert fetched.job_id == job.job_id
                    job_ids[request_id] = job.job_id
                    if len(job_ids) >= ROUNDS_BEFORE_SIGTERM:
                        sigterm_due.set()
                    if len(job_ids) >= stop_at:
                        return

            callers = [asyncio.create_task(caller()) for _ in range(CONCURRENT_CALLERS)]
            await asyncio.wait_for(sigterm_due.wait(), 20)
            draining.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(draining.process.wait(), 20) == 0
            stop_at = len(job_ids) + ROUNDS_AFTER_EXIT
            await asyncio.wait_for(asyncio.gather(*callers), 20)

    assert ROUNDS_BEFORE_SIGTERM + ROUNDS_AFTER_EXIT <= len(job_ids) < MAX_ROUNDS
    connection = await asyncpg.connect(database_url)
    try:
        stored = await connection.fetchval(
            "SELECT count(*) FROM jobs.jobs WHERE profile_id = $1", profile_id
        )
    finally:
        await connection.close()
    assert stored == len(set(job_ids.values())) == len(job_ids)
    assert served(draining.output, "CreateJob") > 0
    assert served(staying.output, "CreateJob") > 0
    assert served(draining.output, "GetJob") + served(staying.output, "GetJob") == len(job_ids)
