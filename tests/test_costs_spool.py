"""Record calls survive the database going away: they are spooled to a local file, replayed
when it is back (or when the service restarts), and counted once."""

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pgserver
import pytest
from costs.v1 import costs_pb2, costs_pb2_grpc

from services.costs.service import costs_definition
from services.runtime.server import RunningService
from tests.conftest import Metadata, as_profile, new_profile_id, running, settings_for
from tests.metrics_scrape import sample, scrape


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
            assert sample(await scrape(service), "costs_spool_lines") == waiting


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
            assert await request_ids(stub, profile) == ["first", "spooled"]
    assert not spool_path.exists()
