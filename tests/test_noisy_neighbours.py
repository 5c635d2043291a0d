"""One profile cannot slow, starve or crash the suite for another.

Each scenario measures a quiet profile's calls alone, then again while another profile attacks
one way, on services started with the scenario's limits spelled out. The quiet profile must see
no error at all, and its p99 under attack must stay within a bound loose enough for a loaded
2-core machine, which the unprotected suite broke by seconds. The goal itself, p99 under attack
≤ max(3 x p99 alone, p99 alone + 50 ms), is reported beside every scenario in the
"noisy-neighbour figures" at the end of the run.

The attacker runs in a process of its own (tests/noisy_attacker.py), as a client on another
machine would: its calls cost the services' event loop only the serving.
"""

import asyncio
import base64
import collections
import gc
import itertools
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest
from costs.v1 import costs_pb2, costs_pb2_grpc
from google.protobuf import field_mask_pb2, struct_pb2
from google.protobuf.message import Message
from jobs.v1 import jobs_pb2, jobs_pb2_grpc
from publisher.v1 import publisher_pb2, publisher_pb2_grpc

from services.costs.service import costs_definition
from services.jobs.service import JOBS, jobs_definition
from services.jobs.watch import WatchLimits
from services.publisher.fake_postiz import api_root, serve_fake_postiz
from services.publisher.service import publisher_definition
from services.publisher.settings import PostizLimits, PublisherSettings
from services.runtime.fields import MAX_STRUCT_VALUES
from services.runtime.interceptors.server import ACCESS_LOG_FAILURES
from services.runtime.server import RunningService, settle_garbage_collector
from tests.conftest import REPO, Metadata, as_profile, new_profile_id, running, settings_for
from tests.noisy_attacker import UNIQUE
from tests.slow_postiz import serve_slow_postiz

Code = grpc.StatusCode

QUIET_DEADLINE_SECONDS = 3.0
WARM_UP_SECONDS = 0.3
ALONE_SECONDS = 1.5
SETTLE_SECONDS = 1.0
UNDER_ATTACK_SECONDS = 3.0
DB_POOL_MAX_SIZE = 10


@pytest.fixture(scope="module", autouse=True)
def _collector_as_served() -> Iterator[None]:
    """The services run in this process: its garbage collector set as `serve` sets theirs."""
    thresholds = gc.get_threshold()
    settle_garbage_collector()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def goal_seconds(alone_p99: float) -> float:
    """What a neighbour may cost the quiet profile's p99 (reported)."""
    return max(3 * alone_p99, alone_p99 + 0.05)


def bound_seconds(alone_p99: float) -> float:
    """What it may cost on a loaded shared machine before the test fails (asserted)."""
    return max(10 * alone_p99, alone_p99 + 1.0)


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)]


QuietCall = Callable[[], Awaitable[object]]


@dataclass
class QuietRun:
    """A quiet profile's calls over a while: every call's latency, failed ones included."""

    latencies: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 0.99)


async def run_quiet(calls: Sequence[QuietCall], seconds: float) -> QuietRun:
    """The calls in turn, one at a time, for `seconds`."""
    run = QuietRun()
    end = time.monotonic() + seconds
    for call in itertools.cycle(calls):
        if time.monotonic() >= end:
            return run
        start = time.perf_counter()
        try:
            await call()
        except grpc.aio.AioRpcError as error:
            run.errors[error.code().name] += 1
        run.latencies.append(time.perf_counter() - start)
    raise AssertionError("unreachable")


class Attack:
    """The attacking profile's workers, run by tests/noisy_attacker.py in a process of its
    own: each repeats its call as soon as it is answered (after the retry delay a refusal
    asks for, if any), and the answers are counted by status."""

    def __init__(self) -> None:
        self.workers: list[dict] = []
        self.outcomes: collections.Counter[str] = collections.Counter()

    def add(
        self,
        count: int,
        service: RunningService,
        method: str,
        request: Message,
        profile: Metadata,
        *,
        streaming: bool = False,
        channel: int = 0,
    ) -> None:
        """`count` workers calling `method` with `request` (UNIQUE in it: a fresh UUID each
        call); a streaming call is left unread until it ends. Workers with the same channel
        number share a connection."""
        self.workers.append(
            {
                "target": f"127.0.0.1:{service.port}",
                "method": method,
                "payload": base64.b64encode(request.SerializeToString()).decode(),
                "metadata": profile,
                "count": count,
                "streaming": streaming,
                "channel": channel,
            }
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator["Attack"]:
        """Every worker has sent its first call when the block starts; the answers are
        counted when it ends."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.noisy_attacker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        assert process.stdin is not None
        assert process.stdout is not None
        try:
            process.stdin.write(json.dumps(self.workers).encode() + b"\n")
            await process.stdin.drain()
            launched = await asyncio.wait_for(process.stdout.readline(), 60)
            assert launched == b"launched\n", launched
            yield self
            process.stdin.close()
            counted = await asyncio.wait_for(process.stdout.readline(), 60)
            self.outcomes.update(json.loads(counted))
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()

    @property
    def refusals(self) -> dict[str, int]:
        return {code: n for code, n in sorted(self.outcomes.items()) if code != "OK"}


@asynccontextmanager
async def longest_stall() -> AsyncIterator[list[float]]:
    """The longest the services' event loop (the test's) ran without a break during the
    block: whether an attack blocks the loop (CPU), rather than queues calls."""
    longest = [0.0]

    async def tick() -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.005)
            longest[0] = max(longest[0], time.perf_counter() - start - 0.005)

    ticking = asyncio.ensure_future(tick())
    try:
        yield longest
    finally:
        ticking.cancel()


@dataclass
class Scenario:
    name: str
    alone: QuietRun
    under_attack: QuietRun
    attack: Attack
    notes: str = ""
    longest_stall: float = 0.0

    @property
    def goal_met(self) -> bool:
        return self.under_attack.p99 <= goal_seconds(self.alone.p99)

    def line(self) -> str:
        def ms(seconds: float) -> str:
            return f"{seconds * 1000:.1f} ms"

        errors = ", ".join(f"{c}={n}" for c, n in sorted(self.under_attack.errors.items()))
        refusals = ", ".join(f"{c}={n}" for c, n in self.attack.refusals.items())
        return (
            f"quiet p50 {ms(self.alone.p50)}, p99 {ms(self.alone.p99)} alone "
            f"({len(self.alone.latencies)} calls); p99 {ms(self.under_attack.p99)} under attack "
            f"({len(self.under_attack.latencies)} calls, "
            f"{self.under_attack.p99 / self.alone.p99:.1f}x); "
            f"goal ≤ {ms(goal_seconds(self.alone.p99))}: {'yes' if self.goal_met else 'NO'}; "
            f"quiet errors: {errors or 'none'}; "
            f"attacker: {self.attack.outcomes['OK']} OK, refused: {refusals or 'none'}; "
            f"longest event-loop stall {ms(self.longest_stall)}"
            + (f"; {self.notes}" if self.notes else "")
        )


async def measure(
    name: str,
    quiet: Sequence[QuietCall],
    attack: Attack,
    figures: dict[str, str],
    notes: Callable[[], str] = lambda: "",
) -> Scenario:
    """The quiet calls alone (after a warm-up), then under the attack once it has settled
    (steady state: its arrival is a moment, the attack lasts); the figures recorded before
    any check."""
    await run_quiet(quiet, WARM_UP_SECONDS)
    alone = await run_quiet(quiet, ALONE_SECONDS)
    async with attack.running(), longest_stall() as stall:
        await asyncio.sleep(SETTLE_SECONDS)  # the attack's calls arrive, its queues fill
        under_attack = await run_quiet(quiet, UNDER_ATTACK_SECONDS)
    scenario = Scenario(name, alone, under_attack, attack, notes(), stall[0])
    figures[name] = scenario.line()
    return scenario


def assert_quiet_profile_unharmed(scenario: Scenario) -> None:
    assert not scenario.alone.errors, scenario.line()
    assert not scenario.under_attack.errors, scenario.line()
    assert scenario.under_attack.p99 <= bound_seconds(scenario.alone.p99), scenario.line()


# The services, with the limits every scenario relies on spelled out


# Each profile's fair share of a replica, the database's bounds, gRPC's own limits: the
# deployment's defaults, written out.
FAIR_SHARES: dict[str, object] = {
    "db_pool_max_size": DB_POOL_MAX_SIZE,
    "profile_max_calls_in_flight": 32,
    "profile_queue_seconds": 0.25,
    "profile_calls_per_second": 100,
    "profile_calls_burst": 200,
    "profile_max_streams": 128,
    "grpc_max_concurrent_streams": 512,
    "grpc_max_concurrent_rpcs": 12_000,
    "db_acquire_timeout_seconds": 5.0,
    "db_statement_timeout_seconds": 10.0,
    "access_log": ACCESS_LOG_FAILURES,
}
# As the manifests deploy them: no tracing. (With tracing on, OpenTelemetry's interceptor
# formats the traceback of every refused call twice, about 2 ms of the replica's CPU each.)
AS_DEPLOYED = {"trace_calls": False}


def jobs_settings(database_url: str, **overrides: object):
    return settings_for(database_url, **(FAIR_SHARES | AS_DEPLOYED | overrides))


@asynccontextmanager
async def channels(service: RunningService, count: int) -> AsyncIterator[list[grpc.aio.Channel]]:
    """`count` channels (connections) to the service: one per client."""
    opened = [grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") for _ in range(count)]
    try:
        yield opened
    finally:
        for channel in opened:
            await channel.close()


def quiet_jobs_calls(stub: jobs_pb2_grpc.JobServiceStub, profile: Metadata) -> list[QuietCall]:
    """CreateJob then GetJob of the job just made: what a store's pipeline does all day."""
    made: list[str] = []

    async def create() -> None:
        job = jobs_pb2.Job(kind="video_render")
        job.data.update({"product": "sku-1", "scenes": [1, 2, 3]})
        reply = await stub.CreateJob(
            jobs_pb2.CreateJobRequest(job=job), metadata=profile, timeout=QUIET_DEADLINE_SECONDS
        )
        made.append(reply.job_id)

    async def get() -> None:
        await stub.GetJob(
            jobs_pb2.GetJobRequest(job_id=made[-1]),
            metadata=profile,
            timeout=QUIET_DEADLINE_SECONDS,
        )

    return [create, get]


def quiet_costs_call(stub: costs_pb2_grpc.CostServiceStub, profile: Metadata) -> QuietCall:
    async def record() -> None:
        await stub.RecordUsage(usage_request(), metadata=profile, timeout=QUIET_DEADLINE_SECONDS)

    return record


def usage_request(request_id: str = "") -> costs_pb2.RecordUsageRequest:
    return costs_pb2.RecordUsageRequest(
        request_id=request_id or f"req-{uuid.uuid4()}",
        provider="acme",
        model="voice-1",
        unit="seconds",
        quantity="12.5",
    )


async def create_job(stub: jobs_pb2_grpc.JobServiceStub, profile: Metadata, **data) -> str:
    job = jobs_pb2.Job(kind="video_render")
    job.data.update(data)
    return (await stub.CreateJob(jobs_pb2.CreateJobRequest(job=job), metadata=profile)).job_id


async def copy_job(database_url: str, job_id: str, count: int) -> None:
    """`count` copies of a job made through the API (its data as CreateJob stored it, JSON and
    Struct bytes), written straight into the table: quicker than through the API, and making
    them is not the attack, reading them is."""
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            """
            INSERT INTO jobs.jobs (profile_id, kind, data, data_pb)
            SELECT profile_id, kind, data, data_pb
            FROM jobs.jobs, generate_series(1, $2)
            WHERE job_id = $1
            """,
            uuid.UUID(job_id),
            count,
        )
    finally:
        await connection.close()


# a) Big Structs

EMPTY_LISTS = 240_000
# The largest Struct of empty lists still accepted: the list itself is a value too.
LARGEST_ACCEPTED_LISTS = MAX_STRUCT_VALUES - 1
# As many as a default page of ListJobs holds.
LARGEST_JOBS = 50


def struct_of_empty_lists(count: int) -> struct_pb2.Struct:
    """A Struct holding one list of `count` empty lists: few bytes on the wire (4 each), many
    values to convert on every read."""
    struct = struct_pb2.Struct()
    lists = struct.fields["lists"].list_value
    for _ in range(count):
        lists.values.add().list_value.SetInParent()
    return struct


def create_request(data: struct_pb2.Struct) -> jobs_pb2.CreateJobRequest:
    request = jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="video_render"))
    request.job.data.CopyFrom(data)
    return request


async def test_big_structs_read_concurrently_do_not_slow_another_profile(
    database_url, noisy_neighbour_figures
):
    """240,000 values are refused; jobs at the value budget are read 12 at a time, and
    listed a page of them at once."""
    too_big = create_request(struct_of_empty_lists(EMPTY_LISTS))
    assert too_big.ByteSize() < 1_000_000
    largest = create_request(struct_of_empty_lists(LARGEST_ACCEPTED_LISTS))
    attacker = as_profile(new_profile_id())
    async with (
        running(JOBS, jobs_settings(database_url)) as jobs,
        channels(jobs, 1) as [channel],
    ):
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        job_ids = [
            (await stub.CreateJob(largest, metadata=attacker)).job_id for _ in range(LARGEST_JOBS)
        ]
        attack = Attack()
        for job_id in job_ids[:2]:
            get = jobs_pb2.GetJobRequest(job_id=job_id)
            attack.add(6, jobs, "/jobs.v1.JobService/GetJob", get, attacker)
        attack.add(1, jobs, "/jobs.v1.JobService/ListJobs", jobs_pb2.ListJobsRequest(), attacker)
        attack.add(1, jobs, "/jobs.v1.JobService/CreateJob", too_big, attacker)
        scenario = await measure(
            f"a) big Structs (12 GetJob and ListJobs of jobs of {LARGEST_ACCEPTED_LISTS:,} "
            f"empty lists, CreateJob of {EMPTY_LISTS:,} in {too_big.ByteSize():,} bytes)",
            quiet_jobs_calls(stub, as_profile(new_profile_id())),
            attack,
            noisy_neighbour_figures,
        )
    assert_quiet_profile_unharmed(scenario)
    assert scenario.attack.outcomes["INVALID_ARGUMENT"] > 0


# b) A burst

BURST_WORKERS = 300


async def test_burst_of_calls_from_one_profile_does_not_slow_another(
    database_url, tmp_path, noisy_neighbour_figures
):
    """Hundreds of calls kept outstanding: gRPC starts them in arrival order before their
    profile can be read, so the profile's call rate refuses them as they start, before their
    requests are decoded, each told to come back after a delay spread over a second."""
    costs = costs_definition(spool_path=tmp_path / "spool.jsonl", spool_retry_seconds=0.1)
    async with (
        running(JOBS, jobs_settings(database_url)) as jobs,
        running(costs, jobs_settings(database_url)) as costs_service,
        channels(jobs, 1) as [jobs_channel],
        channels(costs_service, 1) as [costs_channel],
    ):
        attacker = as_profile(new_profile_id())
        jobs_stub = jobs_pb2_grpc.JobServiceStub(jobs_channel)
        get = jobs_pb2.GetJobRequest(job_id=await create_job(jobs_stub, attacker))
        create = jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="video_render"))
        record = usage_request(UNIQUE.decode())
        attack = Attack()
        for channel in range(3):  # clients on three connections
            share = BURST_WORKERS // 9
            attack.add(
                share, jobs, "/jobs.v1.JobService/CreateJob", create, attacker, channel=channel
            )
            attack.add(share, jobs, "/jobs.v1.JobService/GetJob", get, attacker, channel=channel)
            attack.add(
                share,
                costs_service,
                "/costs.v1.CostService/RecordUsage",
                record,
                attacker,
                channel=channel,
            )
        quiet_profile = as_profile(new_profile_id())
        quiet = [
            *quiet_jobs_calls(jobs_stub, quiet_profile),
            quiet_costs_call(costs_pb2_grpc.CostServiceStub(costs_channel), quiet_profile),
        ]
        scenario = await measure(
            f"b) burst ({BURST_WORKERS} calls in flight: CreateJob, GetJob, RecordUsage)",
            quiet,
            attack,
            noisy_neighbour_figures,
        )
    assert_quiet_profile_unharmed(scenario)
    assert scenario.attack.outcomes["RESOURCE_EXHAUSTED"] > 0


# c) A slow Postiz

SLOW_POSTIZ_CALLS = 110


def publisher_settings() -> PublisherSettings:
    return PublisherSettings(
        encryption_keys={"test-key": b"k" * 32},
        # A byte every 1.5 s never trips a timeout per read; the limit on the total does.
        postiz_limits=PostizLimits(
            timeout_seconds=5.0,
            connections_per_profile=10,
            pool_wait_seconds=1.0,
            max_response_bytes=1024 * 1024,
        ),
        postiz_get_attempts=3,
        postiz_retry_base_seconds=0.01,
        jobs_target="127.0.0.1:1",  # PublishJob is not called
        # Both Postiz servers are on loopback, over http.
        postiz_trusted_hosts=frozenset({"127.0.0.1", "127.0.0.2"}),
    )


async def set_credentials(
    stub: publisher_pb2_grpc.PublisherServiceStub, profile: Metadata, base_url: str, key: str
) -> None:
    await stub.SetPostizCredentials(
        publisher_pb2.SetPostizCredentialsRequest(base_url=base_url, api_key=key),
        metadata=profile,
    )


async def test_slow_postiz_of_one_profile_does_not_starve_another(
    database_url, noisy_neighbour_figures
):
    definition = publisher_definition(publisher_settings())
    async with (
        serve_fake_postiz() as fake,
        serve_slow_postiz(interval=1.5) as slow,
        running(definition, jobs_settings(database_url)) as publisher,
        channels(publisher, 1) as [channel],
    ):
        stub = publisher_pb2_grpc.PublisherServiceStub(channel)
        quiet_profile = as_profile(new_profile_id())
        organization = fake.add_organization()
        await set_credentials(stub, quiet_profile, api_root(fake), organization.api_key)
        attacker = as_profile(new_profile_id())
        await set_credentials(stub, attacker, slow.api_root, "dribble-" + "k" * 32)

        async def list_integrations() -> None:
            await stub.ListIntegrations(
                publisher_pb2.ListIntegrationsRequest(),
                metadata=quiet_profile,
                timeout=QUIET_DEADLINE_SECONDS,
            )

        attack = Attack()
        attack.add(
            SLOW_POSTIZ_CALLS,
            publisher,
            "/publisher.v1.PublisherService/ListIntegrations",
            publisher_pb2.ListIntegrationsRequest(),
            attacker,
        )
        scenario = await measure(
            f"c) slow Postiz ({SLOW_POSTIZ_CALLS} ListIntegrations, a byte every 1.5 s)",
            [list_integrations],
            attack,
            noisy_neighbour_figures,
            lambda: f"most requests dribbling at once: {slow.most_dribbling}",
        )
    assert_quiet_profile_unharmed(scenario)


# d) Pool hogging

HOGGING_UPDATES = 100
HOGGING_DATA_BYTES = 500_000


async def test_calls_queued_on_one_profiles_row_lock_do_not_starve_the_pool(
    database_url, noisy_neighbour_figures
):
    """Updates of one job wait on its row lock one behind the other, each holding a pool
    connection while it waits."""
    async with (
        running(JOBS, jobs_settings(database_url)) as jobs,
        channels(jobs, 1) as [channel],
    ):
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        attacker = as_profile(new_profile_id())
        update = jobs_pb2.UpdateJobRequest(
            job=jobs_pb2.Job(job_id=await create_job(stub, attacker)),
            update_mask=field_mask_pb2.FieldMask(paths=["data"]),
        )
        update.job.data.update({"frames": "f" * HOGGING_DATA_BYTES})
        attack = Attack()
        attack.add(HOGGING_UPDATES, jobs, "/jobs.v1.JobService/UpdateJob", update, attacker)
        scenario = await measure(
            f"d) pool hogging ({HOGGING_UPDATES} UpdateJob of one job, {DB_POOL_MAX_SIZE} "
            "connections)",
            quiet_jobs_calls(stub, as_profile(new_profile_id())),
            attack,
            noisy_neighbour_figures,
        )
    assert_quiet_profile_unharmed(scenario)


# e) Watchers that never read

IDLE_WATCHERS = 200
WATCHERS_PER_PROFILE = 100
SCENES = 100


async def test_watchers_that_never_read_do_not_slow_another_profile(
    database_url, noisy_neighbour_figures
):
    limits = WatchLimits(per_profile=WATCHERS_PER_PROFILE, per_replica=10_000)
    async with (
        running(jobs_definition(limits), jobs_settings(database_url)) as jobs,
        channels(jobs, 1) as [channel],
    ):
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        attacker = as_profile(new_profile_id())
        scenes = {f"scene-{n}": {"frame": n, "caption": "c" * 20} for n in range(SCENES)}
        job_id = await create_job(stub, attacker, **scenes)
        attack = Attack()
        attack.add(
            IDLE_WATCHERS,
            jobs,
            "/jobs.v1.JobService/WatchJob",
            jobs_pb2.WatchJobRequest(job_id=job_id),
            attacker,
            streaming=True,
        )
        update = jobs_pb2.UpdateJobRequest(
            job=jobs_pb2.Job(job_id=job_id, message=UNIQUE.decode()),
            update_mask=field_mask_pb2.FieldMask(paths=["message"]),
        )
        attack.add(4, jobs, "/jobs.v1.JobService/UpdateJob", update, attacker, channel=1)
        scenario = await measure(
            f"e) {IDLE_WATCHERS} watchers that never read (at most {WATCHERS_PER_PROFILE} a "
            f"profile), a job of {SCENES:,} scenes updated back to back",
            quiet_jobs_calls(stub, as_profile(new_profile_id())),
            attack,
            noisy_neighbour_figures,
        )
    assert_quiet_profile_unharmed(scenario)


# f) Huge list replies

LARGE_JOBS = 500
LIST_WORKERS = 6
LARGE_JOB = {"blob": "0123456789abcdef" * 4096, "tags": [str(t) for t in range(1, 4991)]}


async def test_huge_list_replies_of_one_profile_do_not_slow_another(
    database_url, noisy_neighbour_figures
):
    attacker_id = new_profile_id()
    async with (
        running(JOBS, jobs_settings(database_url)) as jobs,
        channels(jobs, 1) as [channel],
    ):
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        large = await create_job(stub, as_profile(attacker_id), **LARGE_JOB)
        await copy_job(database_url, large, LARGE_JOBS - 1)
        attack = Attack()
        attack.add(
            LIST_WORKERS,
            jobs,
            "/jobs.v1.JobService/ListJobs",
            jobs_pb2.ListJobsRequest(page_size=500),
            as_profile(attacker_id),
        )
        scenario = await measure(
            f"f) huge list replies ({LIST_WORKERS} ListJobs page_size 500 of {LARGE_JOBS} jobs, "
            "64 KB and 4,990 list items each)",
            quiet_jobs_calls(stub, as_profile(new_profile_id())),
            attack,
            noisy_neighbour_figures,
        )
    assert_quiet_profile_unharmed(scenario)
