"""Record calls survive the database going away: they are spooled to a local file, replayed
when it is back (or when the service restarts), and counted once."""

import asyncio
import contextlib
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pgserver
import pytest
from costs.v1 import costs_pb2, costs_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from services.costs.model import UsageLine, elevenlabs_tts_line
from services.costs.service import costs_definition
from services.costs.spool import Spool, append_durably, encode_line
from services.runtime.server import RunningService
from tests.conftest import REPO, Metadata, as_profile, new_profile_id, running, settings_for
from tests.kubernetes_manifests import DEPLOY
from tests.metrics_scrape import sample, scrape

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StoppablePostgres:
    """A PostgreSQL of the test's own that the test stops and starts again.

    It listens on a socket in its data folder, so its URL is the same after a restart.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._server: pgserver.PostgresServer | None = None

    async def start(self) -> str:
        """Starts the server (made on first use) unless it runs; returns its URL."""
        if self._server is not None:
            return self._server.get_uri()
        logging.getLogger("pgserver").setLevel(logging.WARNING)
        self._server = await asyncio.to_thread(pgserver.get_server, self.folder, "stop")
        return self._server.get_uri()

    async def stop(self) -> None:
        if self._server is not None:
            await asyncio.to_thread(self._server.cleanup)
            self._server = None


@pytest.fixture(scope="module")
async def postgres() -> AsyncIterator[StoppablePostgres]:
    """One server for the module (initdb once); each test starts it and may stop it.

    Its folder is not under pytest's temporary folder: pytest resets that folder to mode 0700
    when any run starts, which locks out the unprivileged user pgserver runs the server as.
    """
    folder = Path(tempfile.mkdtemp(prefix="costs-spool-postgres-"))
    server = StoppablePostgres(folder / "data")
    try:
        yield server
    finally:
        await server.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def record(stub: costs_pb2_grpc.CostServiceStub, profile: Metadata, request_id: str):
    return await stub.RecordElevenLabsTTS(
        costs_pb2.RecordElevenLabsTTSRequest(
            request_id=request_id, model_id="eleven_flash_v2_5", characters=1000
        ),
        metadata=profile,
    )


async def request_ids(stub: costs_pb2_grpc.CostServiceStub, profile: Metadata) -> list[str]:
    listed = await stub.ListCostEntries(costs_pb2.ListCostEntriesRequest(), metadata=profile)
    return sorted(entry.request_id for entry in listed.entries)


async def eventually_recorded(
    stub: costs_pb2_grpc.CostServiceStub, profile: Metadata, expected: list[str]
) -> None:
    """Waits (at most 20 s) for the background replay: the spool has no event a client sees."""
    give_up_at = time.monotonic() + 20
    while True:
        try:
            if await request_ids(stub, profile) == expected:
                return
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
        assert time.monotonic() < give_up_at, "spooled lines were not replayed"
        await asyncio.sleep(0.05)


def stub_for(service: RunningService) -> tuple[grpc.aio.Channel, costs_pb2_grpc.CostServiceStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    return channel, costs_pb2_grpc.CostServiceStub(channel)


async def test_records_while_the_database_is_down_are_replayed_once_when_it_is_back(
    postgres, tmp_path
):
    url = await postgres.start()
    profile = as_profile(new_profile_id())
    definition = costs_definition(spool_path=tmp_path / "spool.jsonl", spool_retry_seconds=0.05)
    async with running(definition, settings_for(url)) as service:
        channel, stub = stub_for(service)
        async with channel:
            assert not (await record(stub, profile, "before")).spooled
            waiting = sample(await scrape(service), "costs_spool_lines")  # process-wide
            await postgres.stop()

            assert (await record(stub, profile, "during")).spooled
            assert (await record(stub, profile, "before")).spooled
            streamed = await stub.StreamUsage(
                iter(
                    costs_pb2.StreamUsageRequest(
                        lines=[
                            costs_pb2.UsageLine(
                                elevenlabs_tts=costs_pb2.RecordElevenLabsTTSRequest(
                                    request_id=f"streamed-{n}", model_id="eleven_v3", characters=10
                                )
                            )
                        ]
                    )
                    for n in range(2)
                ),
                metadata=profile,
            )
            assert (streamed.accepted, streamed.spooled) == (2, 2)
            assert (tmp_path / "spool.jsonl").stat().st_size > 0
            assert sample(await scrape(service), "costs_spool_lines") == waiting + 4

            await postgres.start()
            await eventually_recorded(
                stub, profile, ["before", "during", "streamed-0", "streamed-1"]
            )
            # The gauge drops once the whole spool file is confirmed, just after its lines
            # are visible.
            give_up_at = time.monotonic() + 20
            while sample(await scrape(service), "costs_spool_lines") != waiting:
                assert time.monotonic() < give_up_at, "the spool gauge did not drop"
                await asyncio.sleep(0.05)


async def test_a_service_restarted_with_a_non_empty_spool_replays_it_on_start(postgres, tmp_path):
    url = await postgres.start()
    profile = as_profile(new_profile_id())
    spool_path = tmp_path / "spool.jsonl"
    # Replays only at start-up within this test: the background retry is far off.
    definition = costs_definition(spool_path=spool_path, spool_retry_seconds=3600)
    async with running(definition, settings_for(url)) as service:
        channel, stub = stub_for(service)
        async with channel:
            await record(stub, profile, "first")
            await postgres.stop()
            assert (await record(stub, profile, "spooled")).spooled

    await postgres.start()
    async with running(definition, settings_for(url)) as service:
        channel, stub = stub_for(service)
        async with channel:
            await eventually_recorded(stub, profile, ["first", "spooled"])
    assert not spool_path.exists()


def refused_lines() -> float:
    """costs_spool_dead_lettered_total{reason="refused"} of this process, read before any
    service is up to serve it."""
    return REGISTRY.get_sample_value("costs_spool_dead_lettered_total", {"reason": "refused"}) or 0


def tts_line(request_id: str, characters: int = 1000) -> UsageLine:
    return elevenlabs_tts_line(
        request_id=request_id,
        job_id=None,
        model_id="eleven_flash_v2_5",
        voice_id="voice-1",
        characters=characters,
        credits_charged=None,
        text_preview="",
        occurred_at=datetime.now(UTC),
    )


async def read_spool(spool: Spool) -> list[tuple[str, str]]:
    """(profile_id, request_id) of every line a drain hands over, in order."""
    seen: list[tuple[str, str]] = []

    async def collect(profile_id: str, lines: list[UsageLine]) -> None:
        seen.extend((profile_id, line.request_id) for line in lines)

    await spool.drain(collect)
    return seen


async def test_a_torn_last_line_is_cut_off_before_the_next_append(tmp_path):
    path = tmp_path / "spool.jsonl"
    whole = encode_line("store-1", tts_line("acknowledged"))
    append_durably(path, whole + encode_line("store-1", tts_line("torn"))[:40])
    spool = Spool(path, max_bytes=1 << 20)
    await spool.open()
    try:
        assert path.read_bytes() == whole
        await spool.append("store-1", [tts_line("after")])
        assert await read_spool(spool) == [("store-1", "acknowledged"), ("store-1", "after")]
        assert not spool.dead_letter_path.exists()
    finally:
        await spool.close()


# Appends one line at a time to a spool until the disk is "full" (a file size limit: the
# write that crosses it is cut short, the next fails), then prints how many were acknowledged.
FILL_THE_DISK = """
import asyncio, resource, signal, sys
from pathlib import Path
from services.costs.spool import Spool
from services.runtime.errors import Unavailable
from tests.test_costs_spool import tts_line

async def fill(path):
    spool = Spool(path, max_bytes=1 << 30)
    await spool.open()
    acknowledged = 0
    try:
        while True:
            await spool.append("store-1", [tts_line(f"line-{acknowledged}")])
            acknowledged += 1
    except Unavailable:
        print(acknowledged)
    await spool.close()

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))
asyncio.run(fill(Path(sys.argv[1])))
"""


async def test_an_append_the_disk_cannot_hold_leaves_no_torn_line(tmp_path):
    path = tmp_path / "spool.jsonl"
    filled = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FILL_THE_DISK, str(path), stdout=asyncio.subprocess.PIPE, cwd=REPO
    )
    output, _ = await asyncio.wait_for(filled.communicate(), 60)
    assert filled.returncode == 0
    acknowledged = int(output)
    assert path.read_bytes().endswith(b"\n")  # cut back at once, not at the next open
    spool = Spool(path, max_bytes=1 << 20)
    await spool.open()
    try:
        replayed = await read_spool(spool)
    finally:
        await spool.close()
    assert replayed == [("store-1", f"line-{n}") for n in range(acknowledged)]
    assert acknowledged > 0


async def test_an_unreadable_line_goes_to_the_dead_letter_file_and_replay_goes_on(tmp_path):
    path = tmp_path / "spool.jsonl"
    garbage = b'{"profile_id": "store-1", "line": {"request_id": "no other fields"}}\n'
    append_durably(path, encode_line("store-1", tts_line("a")) + garbage)
    append_durably(path, encode_line("store-1", tts_line("b")))
    spool = Spool(path, max_bytes=1 << 20)
    await spool.open()
    try:
        assert await read_spool(spool) == [("store-1", "a"), ("store-1", "b")]
        assert spool.dead_letter_path.read_bytes() == garbage
        assert spool.is_empty()
    finally:
        await spool.close()


async def test_a_line_the_database_refuses_goes_to_the_dead_letter_file_and_replay_goes_on(
    database_url, tmp_path
):
    profile_id = new_profile_id()
    path = tmp_path / "spool.jsonl"
    # A negative quantity prices below zero, which costs.entries' CHECK refuses.
    poison = encode_line(profile_id, tts_line("poison", characters=-1000))
    append_durably(
        path,
        encode_line(profile_id, tts_line("before"))
        + poison
        + encode_line(profile_id, tts_line("after")),
    )
    definition = costs_definition(spool_path=path, spool_retry_seconds=0.05)
    dead_lettered = refused_lines()
    async with running(definition, settings_for(database_url)) as service:
        channel, stub = stub_for(service)
        async with channel:
            await eventually_recorded(stub, as_profile(profile_id), ["after", "before"])
        assert path.with_name("spool.jsonl.dead-letter").read_bytes() == poison
        assert (
            sample(await scrape(service), "costs_spool_dead_lettered_total", reason="refused")
            == dead_lettered + 1
        )


async def test_a_full_spool_answers_unavailable_instead_of_accepting(disposable_postgres, tmp_path):
    definition = costs_definition(spool_path=tmp_path / "spool.jsonl", spool_max_bytes=1)
    async with running(definition, settings_for(disposable_postgres.url)) as service:
        channel, stub = stub_for(service)
        async with channel:
            await asyncio.to_thread(disposable_postgres.stop)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await record(stub, as_profile(new_profile_id()), "does-not-fit")
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "spool is full" in raised.value.details()


@contextlib.contextmanager
def logged(logger: str, message: str) -> Iterator[asyncio.Event]:
    """An event set when `logger` logs a message that contains `message`."""
    event = asyncio.Event()

    class Notice(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if message in record.getMessage():
                event.set()

    handler = Notice()
    logging.getLogger(logger).addHandler(handler)
    try:
        yield event
    finally:
        logging.getLogger(logger).removeHandler(handler)


async def stop_and_see_it_noticed(postgres) -> None:
    """Stops the database and waits until the service's health monitor has seen it go."""
    with logged("services.runtime.server", "database unreachable") as noticed:
        await asyncio.to_thread(postgres.stop)
        await asyncio.wait_for(noticed.wait(), 20)


async def health_of(service: RunningService) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="costs.v1.CostService")
        )
    return answer.status


async def test_health_stays_serving_while_the_database_is_down_and_the_spool_has_room(
    disposable_postgres, tmp_path
):
    definition = costs_definition(spool_path=tmp_path / "spool.jsonl")
    settings = settings_for(disposable_postgres.url, health_check_interval_seconds=0.05)
    async with running(definition, settings) as service:
        await stop_and_see_it_noticed(disposable_postgres)
        assert await health_of(service) == SERVING


async def test_health_is_not_serving_when_the_database_is_down_and_the_spool_is_full(
    disposable_postgres, tmp_path
):
    definition = costs_definition(spool_path=tmp_path / "spool.jsonl", spool_max_bytes=1)
    settings = settings_for(disposable_postgres.url, health_check_interval_seconds=0.05)
    async with running(definition, settings) as service:
        assert await health_of(service) == SERVING  # the database is up
        await stop_and_see_it_noticed(disposable_postgres)
        assert await health_of(service) == NOT_SERVING


async def test_callers_following_the_service_config_are_spooled_while_the_database_is_down(
    disposable_postgres, tmp_path
):
    """deploy/grpc-service-config/costs.json health-checks costs.v1.CostService and balances
    round_robin: a replica whose spool takes the calls must stay in its rotation."""
    profile = as_profile(new_profile_id())
    config = (DEPLOY / "grpc-service-config/costs.json").read_text()
    definition = costs_definition(spool_path=tmp_path / "spool.jsonl")
    settings = settings_for(disposable_postgres.url, health_check_interval_seconds=0.05)
    async with (
        running(definition, settings) as service,
        grpc.aio.insecure_channel(
            f"ipv4:127.0.0.1:{service.port}", options=[("grpc.service_config", config)]
        ) as channel,
    ):
        stub = costs_pb2_grpc.CostServiceStub(channel)
        assert not (await record(stub, profile, "before")).spooled
        await stop_and_see_it_noticed(disposable_postgres)
        assert await health_of(service) == SERVING

        answers = await asyncio.gather(
            *(
                stub.RecordUsage(
                    costs_pb2.RecordUsageRequest(
                        request_id=f"during-{n}",
                        provider="openai",
                        model="gpt-4o",
                        unit="input_tokens",
                        quantity="1000",
                    ),
                    metadata=profile,
                    timeout=10,
                )
                for n in range(20)
            ),
            return_exceptions=True,
        )
    assert [answer.spooled for answer in answers] == [True] * 20, answers
