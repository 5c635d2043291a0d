"""`python -m bench.leasing [--quick] [--json PATH]`: the workers' queue (LeaseJobs) under load.

Two figures, against a Jobs server of its own (a process apart) on a scratch database:
  throughput  jobs leased a second, and server and database CPU per job, with 4 and 16
              workers leasing `--max-jobs` at a time as fast as they can, while `--pending`
              jobs wait among `--profiles` profiles;
  fairness    one profile with `--backlog` pending jobs and `--small-profiles` others that
              each make `--small-jobs` jobs while 4 workers lease as fast as they can: the
              time from each small job's CreateJob reply to the LeaseJobs reply holding it
              (goal: p99 under 2 s).
"""

import argparse
import asyncio
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import asyncpg
import uvloop
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from bench.environment import _channel, _local_postmaster_pid, _process, free_port, serving
from bench.load import process_tree_cpu_seconds
from services.jobs.service import JOBS
from services.runtime.embedded_postgres import scratch_database, start_embedded_postgres
from services.runtime.server import migrate

THROUGHPUT_KIND = "bench_render"
FAIRNESS_KIND = "bench_fair"
BACKLOG_PROFILE = "bench-backlog"
GOAL_P99_SECONDS = 2.0


@dataclass(frozen=True)
class Options:
    pending: int
    profiles: int
    backlog: int
    small_profiles: int
    small_jobs: int
    max_jobs: int
    seconds: float
    json_path: str | None


@dataclass(frozen=True)
class Throughput:
    workers: int
    jobs_per_second: float
    server_cpu_us_per_job: float
    database_cpu_us_per_job: float | None


@dataclass(frozen=True)
class Fairness:
    small_jobs: int
    p50_seconds: float
    p99_seconds: float
    max_seconds: float
    backlog_leased_meanwhile: int
    goal_met: bool


def default_options(quick: bool) -> Options:
    """The full run's figures, or (quick) small data and short runs that prove it works."""
    if quick:
        return Options(20_000, 50, 5_000, 10, 3, 10, 2.0, None)
    return Options(1_000_000, 500, 100_000, 50, 10, 10, 10.0, None)


def parse_options(argv: list[str]) -> Options:
    full = default_options(quick=False)
    parser = argparse.ArgumentParser(prog="python -m bench.leasing", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small data, short runs")
    parser.add_argument("--pending", type=int, help=f"default {full.pending:,}")
    parser.add_argument("--profiles", type=int, help=f"default {full.profiles}")
    parser.add_argument("--backlog", type=int, help=f"default {full.backlog:,}")
    parser.add_argument("--small-profiles", type=int, help=f"default {full.small_profiles}")
    parser.add_argument(
        "--small-jobs", type=int, help=f"jobs of each small profile (default {full.small_jobs})"
    )
    parser.add_argument(
        "--max-jobs", type=int, help=f"max_jobs of each LeaseJobs (default {full.max_jobs})"
    )
    parser.add_argument(
        "--seconds", type=float, help=f"each throughput run (default {full.seconds:g})"
    )
    parser.add_argument("--json", dest="json_path", help="also write the figures here")
    args = parser.parse_args(argv)
    base = default_options(args.quick)
    given = {
        name: value
        for name, value in vars(args).items()
        if name not in ("quick",) and value is not None
    }
    return dataclasses.replace(base, **given)


async def _seed(url: str, options: Options) -> None:
    connection = await asyncpg.connect(url)
    try:
        await migrate(JOBS, connection)
        print(
            f"seeding {options.pending:,} pending jobs among {options.profiles} profiles, and a "
            f"backlog of {options.backlog:,} ...",
            file=sys.stderr,
            flush=True,
        )
        # Written in bulk without the row triggers (a turn and a notification per job), the
        # turns then made at once, as the migration makes those of jobs already pending.
        await connection.execute("SET session_replication_role = replica")
        await connection.execute(
            """
            INSERT INTO jobs.jobs (profile_id, kind, create_time)
            SELECT 'bench-' || (n % $1), $2, clock_timestamp() - interval '1 hour'
            FROM generate_series(1, $3) AS n
            """,
            options.profiles,
            THROUGHPUT_KIND,
            options.pending,
        )
        await connection.execute(
            """
            INSERT INTO jobs.jobs (profile_id, kind, create_time)
            SELECT $1, $2, clock_timestamp() - interval '1 hour'
            FROM generate_series(1, $3)
            """,
            BACKLOG_PROFILE,
            FAIRNESS_KIND,
            options.backlog,
        )
        await connection.execute(
            """
            INSERT INTO jobs.lease_turns (profile_id, kind)
            SELECT DISTINCT profile_id, kind FROM jobs.jobs WHERE status = 'PENDING'
            """
        )
        await connection.execute("RESET session_replication_role")
        await connection.execute("VACUUM ANALYZE jobs.jobs, jobs.lease_turns")
    finally:
        await connection.close()


def _lease_request(kind: str, max_jobs: int, worker: str) -> jobs_pb2.LeaseJobsRequest:
    request = jobs_pb2.LeaseJobsRequest(kinds=[kind], max_jobs=max_jobs, worker=worker)
    request.lease_duration.FromTimedelta(timedelta(hours=1))  # none expires during the run
    return request


async def _throughput(
    stubs: list[jobs_pb2_grpc.JobServiceStub],
    workers: int,
    options: Options,
    server_pid: int,
    database_pid: int | None,
) -> Throughput:
    leased = 0
    stop_at = time.monotonic() + options.seconds

    async def worker(number: int) -> None:
        nonlocal leased
        stub = stubs[number % len(stubs)]
        request = _lease_request(THROUGHPUT_KIND, options.max_jobs, f"worker-{number}")
        while time.monotonic() < stop_at:
            reply = await stub.LeaseJobs(request)
            leased += len(reply.jobs)  # after the await: `+=` around one would lose counts

    server_before = process_tree_cpu_seconds(server_pid)
    database_before = process_tree_cpu_seconds(database_pid) if database_pid else None
    started = time.monotonic()
    await asyncio.gather(*(worker(n) for n in range(workers)))
    elapsed = time.monotonic() - started
    server_cpu = process_tree_cpu_seconds(server_pid) - server_before
    database_cpu = (
        process_tree_cpu_seconds(database_pid) - database_before if database_pid else None
    )
    return Throughput(
        workers,
        leased / elapsed,
        server_cpu * 1e6 / max(leased, 1),
        None if database_cpu is None else database_cpu * 1e6 / max(leased, 1),
    )


async def _fairness(stubs: list[jobs_pb2_grpc.JobServiceStub], options: Options) -> Fairness:
    created: dict[str, float] = {}  # a small profile's job → when its CreateJob was sent
    leased: dict[str, float] = {}  # → when the LeaseJobs reply holding it arrived
    backlog_leased = 0
    expected = options.small_profiles * options.small_jobs
    done = asyncio.Event()

    async def worker(number: int) -> None:
        nonlocal backlog_leased
        stub = stubs[number % len(stubs)]
        request = _lease_request(FAIRNESS_KIND, options.max_jobs, f"fair-{number}")
        while not done.is_set():
            reply = await stub.LeaseJobs(request)
            now = time.monotonic()
            for job in reply.jobs:
                if job.profile_id == BACKLOG_PROFILE:
                    backlog_leased += 1
                else:
                    leased[job.job_id] = now
            if len(leased) >= expected:
                done.set()

    async def small_profile(number: int) -> None:
        stub = stubs[number % len(stubs)]
        metadata = (("x-profile-id", f"bench-small-{number}"),)
        for _ in range(options.small_jobs):
            await asyncio.sleep(random.uniform(0, 0.2))
            sent = time.monotonic()
            job = await stub.CreateJob(
                jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind=FAIRNESS_KIND)), metadata=metadata
            )
            created[job.job_id] = sent

    workers = [asyncio.create_task(worker(n)) for n in range(4)]
    try:
        await asyncio.gather(*(small_profile(n) for n in range(options.small_profiles)))
        await asyncio.wait_for(done.wait(), timeout=120)
    finally:
        done.set()
        await asyncio.gather(*workers)
    ordered = sorted(leased[job_id] - sent for job_id, sent in created.items())
    p99 = ordered[min(int(0.99 * len(ordered)), len(ordered) - 1)]
    return Fairness(
        len(ordered),
        ordered[len(ordered) // 2],
        p99,
        ordered[-1],
        backlog_leased,
        p99 < GOAL_P99_SECONDS,
    )


async def run(options: Options) -> dict:
    admin_url = os.environ.get("DATABASE_URL") or start_embedded_postgres(
        Path(".data/bench-postgres")
    )
    async with scratch_database(admin_url, "bench_leasing") as url, AsyncExitStack() as stack:
        await _seed(url, options)
        connection = await asyncpg.connect(url)
        try:
            database_pid = await _local_postmaster_pid(connection)
        finally:
            await connection.close()
        port = free_port()
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-leasing-")))
        server = await _process(
            stack,
            log_dir,
            "jobs",
            "-m",
            "services.jobs",
            DATABASE_URL=url,
            GRPC_HOST="127.0.0.1",
            GRPC_PORT=str(port),
            METRICS_PORT="0",
            MIGRATE_ON_START="false",
            # All workers lease as one caller (AUTH_MODE=none): no share of theirs binds.
            PROFILE_MAX_CALLS_IN_FLIGHT="0",
            PROFILE_CALLS_PER_SECOND="0",
            DB_CONNECTIONS_PER_PROFILE="0",
        )
        channels = [await _channel(stack, port) for _ in range(4)]
        await asyncio.gather(*(serving(channel) for channel in channels))
        stubs = [jobs_pb2_grpc.JobServiceStub(channel) for channel in channels]
        throughput = [
            await _throughput(stubs, workers, options, server.pid, database_pid)
            for workers in (4, 16)
        ]
        fairness = await _fairness(stubs, options)
    return {
        "options": asdict(options),
        "throughput": [asdict(row) for row in throughput],
        "fairness": asdict(fairness),
    }


def print_figures(results: dict) -> None:
    options = results["options"]
    print(
        f"LeaseJobs, max_jobs {options['max_jobs']}, {options['pending']:,} pending jobs among "
        f"{options['profiles']} profiles"
    )
    print(f"{'workers':>8} {'jobs/s':>10} {'server µs/job':>14} {'db µs/job':>10}")
    for row in results["throughput"]:
        database = row["database_cpu_us_per_job"]
        print(
            f"{row['workers']:>8} {row['jobs_per_second']:>10.0f} "
            f"{row['server_cpu_us_per_job']:>14.0f} "
            f"{'-' if database is None else f'{database:.0f}':>10}"
        )
    fair = results["fairness"]
    print(
        f"fairness: {fair['small_jobs']} jobs of {options['small_profiles']} small profiles "
        f"beside a backlog of {options['backlog']:,}, 4 workers: create → lease p50 "
        f"{fair['p50_seconds'] * 1000:.0f} ms, p99 {fair['p99_seconds'] * 1000:.0f} ms, max "
        f"{fair['max_seconds'] * 1000:.0f} ms (goal p99 < {GOAL_P99_SECONDS:g} s: "
        f"{'yes' if fair['goal_met'] else 'NO'}); backlog jobs leased meanwhile "
        f"{fair['backlog_leased_meanwhile']:,}"
    )


def main(argv: list[str]) -> int:
    options = parse_options(argv)
    results = uvloop.run(run(options))
    print_figures(results)
    if options.json_path:
        Path(options.json_path).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
