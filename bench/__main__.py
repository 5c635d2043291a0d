"""`python -m bench [--quick] [--json PATH]`: every operation against its ceilings.

Ceilings, measured in the same run and interleaved with the suite round by round:
  grpc       a no-op grpc.aio unary handler, no interceptor, no database;
  grpc+icpt  the same handler behind the profile interceptor;
  db         the suite's own store call (its SQL, tenant scoping included) straight through
             asyncpg, at the same concurrency.
The suite's ratio is to the combined ceiling 1 / (1/grpc + 1/db).
"""

import argparse
import asyncio
import dataclasses
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import uvloop
from costs.v1 import costs_pb2
from google.protobuf import field_mask_pb2, struct_pb2, timestamp_pb2
from jobs.v1 import jobs_pb2

from bench import instructions, leasing, round_trips
from bench.environment import COST_MONTH, Suite, bench_database, start_suite
from bench.load import Sample, drive, median_rate, merged
from bench.noop_server import METHOD
from services.costs.model import GroupBy, TimeRange
from services.costs.servicer import elevenlabs_line
from services.costs.store import CostStore
from services.jobs.model import EMPTY_DOCUMENT, JobChanges, JobFilter
from services.jobs.servicer import document
from services.jobs.store import JobStore
from services.runtime.call_context import profile_scope
from services.runtime.page_tokens import encode_page_token
from services.runtime.paging import reply_budget
from services.runtime.settings import Settings

Call = Callable[[], Awaitable[object]]
LINES_PER_MESSAGE = 100
# What a ListJobs reply's rows may take with the default GRPC_MAX_MESSAGE_BYTES.
LIST_REPLY_BYTES = reply_budget(Settings.max_message_bytes)


@dataclass
class Operation:
    name: str
    profile: str
    suite: Call
    db: Call | None = None
    server: str = "jobs"
    lines_per_call: int = 1
    suite_samples: list[Sample] = field(default_factory=list)
    db_samples: list[Sample] = field(default_factory=list)


@dataclass(frozen=True)
class Options:
    quick: bool
    seconds: float
    rounds: int
    concurrency: int
    big_profile_jobs: int
    other_profiles: int
    jobs_per_other_profile: int
    watchers: int
    watch_updates: int
    cost_lines: int
    stream_batch: int
    json_path: str | None
    only: tuple[str, ...] = ()
    instructions: bool = False

    def selects(self, name: str) -> bool:
        """Whether the operation called `name` is measured (--only; the no-op ceilings are
        measured always)."""
        return not self.only or any(text.lower() in name.lower() for text in self.only)


def parse_options(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, small data (CI)")
    parser.add_argument("--json", dest="json_path", help="also write the results here as JSON")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="also count server instructions per hot call under callgrind (minutes)",
    )
    parser.add_argument("--seconds", type=float, help="length of one measurement")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per operation")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="measure only the operations whose names contain TEXT (repeatable)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    return Options(
        quick=quick,
        seconds=args.seconds or (0.3 if quick else 3.0),
        rounds=args.rounds or (1 if quick else 3),
        concurrency=args.concurrency,
        big_profile_jobs=2_000 if quick else 1_000_000,
        other_profiles=500,
        jobs_per_other_profile=2 if quick else 100,
        watchers=50 if quick else 1_000,
        watch_updates=3 if quick else 20,
        cost_lines=20_000 if quick else 1_000_000,
        stream_batch=200 if quick else 2_000,
        json_path=args.json_path,
        only=tuple(args.only),
        instructions=args.instructions,
    )


def _machine_bound(sample: Sample) -> float | None:
    """The calls per second this machine's cores could give at the CPU a call was measured to
    cost, summed over server, database and client: the ceiling of a machine they share. None
    when the database runs elsewhere."""
    if sample.database_cpu_us_per_call is None:
        return None
    spent = sum(
        cpu or 0.0
        for cpu in (
            sample.server_cpu_us_per_call,
            sample.database_cpu_us_per_call,
            sample.client_cpu_us_per_call,
        )
    )
    return len(os.sched_getaffinity(0)) * 1e6 / spent if spent else None


def _row(name: str, sample: Sample, ceiling: float | None, ceiling_name: str) -> dict:
    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 1)

    return {
        "operation": name,
        "per_second": round(sample.per_second, 1),
        "p50_ms": round(sample.percentile(0.5), 2),
        "p99_ms": round(sample.percentile(0.99), 2),
        "server_cpu_us_per_call": rounded(sample.server_cpu_us_per_call),
        "database_cpu_us_per_call": rounded(sample.database_cpu_us_per_call),
        "client_cpu_us_per_call": rounded(sample.client_cpu_us_per_call),
        "machine_bound_per_second": rounded(_machine_bound(sample)),
        "ceiling": ceiling_name,
        "ceiling_per_second": None if ceiling is None else round(ceiling, 1),
        "ratio": None if not ceiling else round(sample.per_second / ceiling, 3),
    }


async def _jobs_operations(suite: Suite, options: Options) -> list[Operation]:
    store = JobStore(suite.store_pool)
    stub = suite.jobs_stub
    writer, big = "bench-writer", "bench-big"
    writer_md, big_md = (("x-profile-id", writer),), (("x-profile-id", big),)
    owned = [
        (await store.create(writer, "render", EMPTY_DOCUMENT, None)).job_id for _ in range(1000)
    ]
    async with suite.store_pool.pool.acquire() as connection:
        sampled = await connection.fetch(
            "SELECT job_id FROM jobs.jobs WHERE profile_id = $1 LIMIT 1000", big
        )
        deep = await connection.fetchrow(
            "SELECT create_time, job_id FROM jobs.jobs WHERE profile_id = $1 "
            "ORDER BY create_time DESC, job_id DESC OFFSET $2 LIMIT 1",
            big,
            int(options.big_profile_jobs * 0.9),
        )
    big_ids = [row["job_id"] for row in sampled]
    position = (deep["create_time"], deep["job_id"])
    with profile_scope(big):
        deep_token = encode_page_token(position, JobFilter().as_key())

    create = jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="render"))
    create.job.data.update({"product": "sku-1"})
    product = document(struct_pb2.Struct(fields=create.job.data.fields), "data")
    mask = field_mask_pb2.FieldMask(paths=["progress"])

    def update_request() -> jobs_pb2.UpdateJobRequest:
        job = jobs_pb2.Job(job_id=str(random.choice(owned)), progress=random.randint(0, 100))
        return jobs_pb2.UpdateJobRequest(job=job, update_mask=mask)

    return [
        Operation(
            "CreateJob",
            writer,
            lambda: stub.CreateJob(create, metadata=writer_md),
            lambda: store.create(writer, "render", product, None),
        ),
        Operation(
            "GetJob",
            big,
            lambda: stub.GetJob(
                jobs_pb2.GetJobRequest(job_id=str(random.choice(big_ids))), metadata=big_md
            ),
            lambda: store.get(big, random.choice(big_ids)),
        ),
        Operation(
            "UpdateJob",
            writer,
            lambda: stub.UpdateJob(update_request(), metadata=writer_md),
            lambda: store.update(
                writer, random.choice(owned), JobChanges({"progress": random.randint(0, 100)}), None
            ),
        ),
        Operation(
            "ListJobs first page",
            big,
            lambda: stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=50), metadata=big_md),
            lambda: store.list(big, JobFilter(), 50, None, max_bytes=LIST_REPLY_BYTES),
        ),
        Operation(
            "ListJobs deep page",
            big,
            lambda: stub.ListJobs(
                jobs_pb2.ListJobsRequest(page_size=50, page_token=deep_token), metadata=big_md
            ),
            lambda: store.list(big, JobFilter(), 50, position, max_bytes=LIST_REPLY_BYTES),
        ),
    ]


async def _costs_operations(suite: Suite, options: Options) -> list[Operation]:
    store = CostStore(suite.costs_pool)
    stubs = suite.costs_stubs
    writer, big = "bench-costs-writer", "bench-costs"
    writer_md, big_md = (("x-profile-id", writer),), (("x-profile-id", big),)

    def tts() -> costs_pb2.RecordElevenLabsTTSRequest:
        return costs_pb2.RecordElevenLabsTTSRequest(
            request_id=f"tts-{uuid.uuid4()}",
            model_id="eleven_flash_v2_5",
            voice_id="v1",
            characters=1200,
            text_preview="Hello",
        )

    def batch() -> list[costs_pb2.StreamUsageRequest]:
        """The call's lines, LINES_PER_MESSAGE to a message."""
        lines = [costs_pb2.UsageLine(elevenlabs_tts=tts()) for _ in range(options.stream_batch)]
        return [
            costs_pb2.StreamUsageRequest(lines=lines[i : i + LINES_PER_MESSAGE])
            for i in range(0, len(lines), LINES_PER_MESSAGE)
        ]

    month_end = COST_MONTH + timedelta(days=31)
    summary = costs_pb2.GetCostSummaryRequest(
        start_time=_timestamp(COST_MONTH),
        end_time=_timestamp(month_end),
        group_by=[costs_pb2.MODEL, costs_pb2.DAY],
    )
    return [
        Operation(
            "RecordElevenLabsTTS",
            writer,
            lambda: random.choice(stubs).RecordElevenLabsTTS(tts(), metadata=writer_md),
            lambda: store.record(writer, elevenlabs_line(tts())),
        ),
        Operation(
            "GetCostSummary (a month)",
            big,
            lambda: random.choice(stubs).GetCostSummary(summary, metadata=big_md),
            lambda: store.summary(
                big, TimeRange(COST_MONTH, month_end), None, [GroupBy.MODEL, GroupBy.DAY]
            ),
        ),
        Operation(
            f"StreamUsage ({options.stream_batch} lines a call)",
            writer,
            lambda: random.choice(stubs).StreamUsage(iter(batch()), metadata=writer_md),
            lambda: store.record_many(
                writer, [elevenlabs_line(line.elevenlabs_tts) for r in batch() for line in r.lines]
            ),
            lines_per_call=options.stream_batch,
        ),
    ]


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


async def _watch_fan_out(suite: Suite, options: Options) -> Sample:
    """N watchers of one job; each update's delivery latency to every watcher."""
    profile = (("x-profile-id", "bench-watch"),)
    stub = suite.jobs_stub
    job = await stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="w")), metadata=profile
    )
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    all_delivered = asyncio.Event()
    pending = 0

    async def watcher(channel_stub: object) -> None:
        nonlocal pending
        call = channel_stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=profile)
        async for update in call:
            if update.progress in sent_at:
                latencies.append((time.perf_counter() - sent_at[update.progress]) * 1000)
                pending -= 1
                if pending == 0:
                    all_delivered.set()

    stubs = suite.jobs_stubs
    watchers = [
        asyncio.create_task(watcher(stubs[i % len(stubs)])) for i in range(options.watchers)
    ]
    await asyncio.sleep(1.0)  # let every stream open and send its first message
    started = time.perf_counter()
    mask = field_mask_pb2.FieldMask(paths=["progress"])
    for progress in range(1, options.watch_updates + 1):
        all_delivered.clear()
        pending = options.watchers
        sent_at[progress] = time.perf_counter()
        await stub.UpdateJob(
            jobs_pb2.UpdateJobRequest(
                job=jobs_pb2.Job(job_id=job.job_id, progress=progress), update_mask=mask
            ),
            metadata=profile,
        )
        await asyncio.wait_for(all_delivered.wait(), 30)
    elapsed = time.perf_counter() - started
    for task in watchers:
        task.cancel()
    return Sample(len(latencies), elapsed, latencies)


async def _measure(suite: Suite, options: Options) -> dict:
    payload = b"x" * 64
    md = (("x-profile-id", "bench-noop"),)
    noop_samples: dict[str, list[Sample]] = {name: [] for name in suite.noop}
    operations = await _jobs_operations(suite, options)
    costs_operations = await _costs_operations(suite, options)
    for operation in costs_operations:
        operation.server = "costs"
    operations = [op for op in operations + costs_operations if options.selects(op.name)]
    run = {
        "concurrency": options.concurrency,
        "seconds": options.seconds,
        "database_pid": suite.database_pid,
    }
    for _ in range(options.rounds):
        for name, (pid, channel) in suite.noop.items():
            call = channel.unary_unary(METHOD)
            noop_samples[name].append(
                await drive(lambda call=call: call(payload, metadata=md), server_pid=pid, **run)
            )
        for operation in operations:
            if operation.db is not None:  # the store calls name their profile
                operation.db_samples.append(await drive(operation.db, **run))
            pid = suite.costs_pid if operation.server == "costs" else suite.jobs_pid
            operation.suite_samples.append(await drive(operation.suite, server_pid=pid, **run))
    grpc_name, *interceptor_names = noop_samples
    grpc_rate = median_rate(noop_samples[grpc_name])
    rows = [_row(grpc_name, merged(noop_samples[grpc_name]), None, "")]
    for name in interceptor_names:
        row = _row(name, merged(noop_samples[name]), grpc_rate, "grpc")
        row["per_second"] = round(median_rate(noop_samples[name]), 1)
        row["ratio"] = round(row["per_second"] / grpc_rate, 3)
        rows.append(row)
    for operation in operations:
        db_rate = median_rate(operation.db_samples)
        combined = 1 / (1 / grpc_rate + 1 / db_rate)
        rows.append(_row(f"{operation.name} (db only)", merged(operation.db_samples), None, ""))
        suite_sample = merged(operation.suite_samples)
        row = _row(operation.name, suite_sample, combined, "1/(1/grpc+1/db)")
        row["per_second"] = round(median_rate(operation.suite_samples), 1)
        row["ratio"] = round(row["per_second"] / combined, 3)
        if operation.lines_per_call > 1:
            row["lines_per_second"] = round(row["per_second"] * operation.lines_per_call)
        rows.append(row)
    watch_name = f"WatchJob fan-out ({options.watchers} watchers)"
    if options.selects(watch_name):
        watch = await _watch_fan_out(suite, options)
        watch_row = _row(watch_name, watch, None, "")
        watch_row["per_second"] = round(watch.per_second, 1)
        rows.append(watch_row)
    return {"rows": rows}


def _random_get(stubs: list, ids: list[str], metadata: tuple) -> Call:
    def get() -> Awaitable[object]:
        request = jobs_pb2.GetJobRequest(job_id=random.choice(ids))
        return random.choice(stubs).GetJob(request, metadata=metadata)

    return get


async def _measure_workers(options: Options, database_url: str) -> list[dict]:
    rows = []
    for workers in (1, 2):
        if not options.selects(f"GetJob, {workers} worker(s)"):
            continue
        async with start_suite(database_url, workers=workers, noop=False) as suite:
            big_md = (("x-profile-id", "bench-big"),)
            async with suite.store_pool.pool.acquire() as connection:
                ids = [
                    str(r["job_id"])
                    for r in await connection.fetch(
                        "SELECT job_id FROM jobs.jobs WHERE profile_id = 'bench-big' LIMIT 500"
                    )
                ]
            get = _random_get(suite.jobs_stubs, ids, big_md)
            samples = [
                await drive(
                    get,
                    concurrency=options.concurrency * 2,
                    seconds=options.seconds,
                    server_pid=suite.jobs_pid,
                    database_pid=suite.database_pid,
                )
                for _ in range(options.rounds)
            ]
            row = _row(
                f"GetJob, {workers} worker(s), {len(suite.jobs_stubs)} connections",
                merged(samples),
                None,
                "",
            )
            row["per_second"] = round(median_rate(samples), 1)
            rows.append(row)
    return rows


def _print_table(rows: list[dict]) -> None:
    """The table; CPU is in microseconds per call, of the server, the database and the
    benchmark's own process (client); machine/s is the most calls per second this machine's
    cores could give at that CPU per call."""
    header = (
        f"{'operation':<44} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'ceiling/s':>9} "
        f"{'ratio':>5} {'CPU us/call: server':>19} {'db':>7} {'client':>7} {'machine/s':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        ceiling = "" if row["ceiling_per_second"] is None else f"{row['ceiling_per_second']:.0f}"
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}"
        server, database, client, machine = (
            "" if row[key] is None else f"{row[key]:.0f}"
            for key in (
                "server_cpu_us_per_call",
                "database_cpu_us_per_call",
                "client_cpu_us_per_call",
                "machine_bound_per_second",
            )
        )
        print(
            f"{row['operation']:<44} {row['per_second']:>8.0f} {row['p50_ms']:>7.2f} "
            f"{row['p99_ms']:>7.2f} {ceiling:>9} {ratio:>5} {server:>19} {database:>7} "
            f"{client:>7} {machine:>9}"
        )


async def run(options: Options) -> dict:
    async with bench_database(options) as database_url:
        async with start_suite(database_url, workers=1, noop=True) as suite:
            results = await _measure(suite, options)
        results["rows"] += await _measure_workers(options, database_url)
        # Counts that do not move with the machine: round trips and statements per call on
        # the wire, and (--instructions) the server's instructions per call under callgrind.
        results["round_trips"] = [
            dataclasses.asdict(figure) for figure in await round_trips.measure(database_url)
        ]
        if options.selects("LeaseJobs"):
            results["leasing"] = await leasing.run(leasing.default_options(options.quick))
        if options.instructions:
            results["instructions"] = [
                dataclasses.asdict(figure)
                for figure in await instructions.measure(database_url, 50, instructions.REPO)
            ]
    return results


def main(argv: list[str]) -> int:
    options = parse_options(argv)
    results = uvloop.run(run(options))  # the loop the services run on
    results["options"] = options.__dict__
    results["cpu_count"] = os.cpu_count()
    _print_table(results["rows"])
    print(f"\n{'operation':<44} {'round trips/call':>16} {'statements/call':>15}")
    for figure in results["round_trips"]:
        print(
            f"{figure['operation']:<44} {figure['round_trips']:>16.2f} "
            f"{figure['statements']:>15.2f}"
        )
    if "leasing" in results:
        print()
        leasing.print_figures(results["leasing"])
    for figure in results.get("instructions", []):
        print(f"{figure['operation']:<44} {figure['instructions_per_call']:>16,.0f} instructions")
    if options.json_path:
        with open(options.json_path, "w") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
