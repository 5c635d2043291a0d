"""The Costs spool under faults, with `python -m services.costs` run as its own process: killed
mid-load, a spool far larger than its memory, a torn tail and a poison line. No acknowledged
line is lost. Each test records its figures; `make test` prints them under "fault figures"."""

import asyncio
import time
from pathlib import Path

import asyncpg
import grpc
from costs.v1 import costs_pb2, costs_pb2_grpc

from services.costs.spool import append_durably, encode_line
from tests.conftest import as_profile, new_profile_id, server_process
from tests.test_costs_spool import tts_line

WRITERS = 8
ACKNOWLEDGED_BEFORE_KILL = 300
LARGE_SPOOL_LINES = 100_000
# The Costs pod's memory limit (deploy/k8s/base/costs.yaml), as a limit on the process's
# address space: stricter than the pod's, which counts resident memory only. So that
# reserved but unused address space does not count against it, thread stacks are 2 MiB
# instead of 8 and glibc keeps two malloc arenas instead of one per thread (64 MiB each).
MEMORY_LIMIT = ("prlimit", f"--as={256 * 1024 * 1024}", f"--stack={2 * 1024 * 1024}")
MEMORY_LIMIT_ENVIRONMENT = {"MALLOC_ARENA_MAX": "2"}


def spool_environment(spool_path: Path) -> dict[str, str]:
    return {"COSTS_SPOOL_PATH": str(spool_path), "COSTS_SPOOL_RETRY_SECONDS": "0.1"}


def spooled_line(profile_id: str, request_id: str, characters: int = 1000) -> bytes:
    return encode_line(profile_id, tts_line(request_id, characters))


async def recorded(database_url: str, profile_id: str, expected: int, within: float) -> int:
    """How many of the profile's lines are in the database once `expected` are, or once
    `within` seconds have passed: replay has no event a client sees, so the count is
    polled."""
    connection = await asyncpg.connect(database_url)
    try:
        give_up_at = time.monotonic() + within
        while True:
            count = await connection.fetchval(
                "SELECT count(*) FROM costs.entries WHERE profile_id = $1", profile_id
            )
            if count >= expected or time.monotonic() > give_up_at:
                return count
            await asyncio.sleep(0.1)
    finally:
        await connection.close()


def peak_resident_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


async def test_spooled_lines_survive_a_killed_and_restarted_process(
    disposable_postgres, tmp_path, fault_figures
):
    profile_id = new_profile_id()
    environment = spool_environment(tmp_path / "spool.jsonl")
    acknowledged: list[str] = []
    failed: list[str] = []
    kill_due = asyncio.Event()

    async with server_process("costs", disposable_postgres.url, **environment) as first:
        await asyncio.to_thread(disposable_postgres.stop)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            stub = costs_pb2_grpc.CostServiceStub(channel)

            async def writer(number: int) -> None:
                for call in range(10_000):
                    request_id = f"writer-{number}-{call}"
                    try:
                        answer = await stub.RecordElevenLabsTTS(
                            costs_pb2.RecordElevenLabsTTSRequest(
                                request_id=request_id, model_id="eleven_flash_v2_5", characters=10
                            ),
                            metadata=as_profile(profile_id),
                            timeout=10,
                        )
                    except grpc.aio.AioRpcError:
                        failed.append(request_id)  # the process is gone: never acknowledged
                        return
                    assert answer.spooled
                    acknowledged.append(request_id)
                    if len(acknowledged) >= ACKNOWLEDGED_BEFORE_KILL:
                        kill_due.set()

            writers = [asyncio.create_task(writer(n)) for n in range(WRITERS)]
            await asyncio.wait_for(kill_due.wait(), 30)
            first.process.kill()  # SIGKILL: no shutdown, calls in flight
            await first.process.wait()
            await asyncio.wait_for(asyncio.gather(*writers), 30)

    await asyncio.to_thread(disposable_postgres.start)
    async with server_process("costs", disposable_postgres.url, **environment):
        count = await recorded(disposable_postgres.url, profile_id, len(acknowledged), 30)
        connection = await asyncpg.connect(disposable_postgres.url)
        try:
            stored = {
                row["request_id"]
                for row in await connection.fetch(
                    "SELECT request_id FROM costs.entries WHERE profile_id = $1", profile_id
                )
            }
        finally:
            await connection.close()

    lost = set(acknowledged) - stored
    fault_figures["Costs spool: SIGKILL mid-load, restart"] = {
        "calls": len(acknowledged) + len(failed),
        "acknowledged": len(acknowledged),
        "faults": 1,
        "replayed": count,
        "lost": len(lost),
    }
    assert not lost
    assert stored <= set(acknowledged) | set(failed)


async def test_a_spool_larger_than_memory_replays_in_bounded_memory(
    database_url, tmp_path, fault_figures
):
    profile_id = new_profile_id()
    spool_path = tmp_path / "spool.jsonl"
    batch = 10_000
    for start in range(0, LARGE_SPOOL_LINES, batch):
        append_durably(
            spool_path,
            b"".join(spooled_line(profile_id, f"line-{n}") for n in range(start, start + batch)),
        )
    spool_mib = spool_path.stat().st_size // 2**20
    started = time.monotonic()
    async with server_process(
        "costs",
        database_url,
        wrapper=MEMORY_LIMIT,
        **spool_environment(spool_path),
        **MEMORY_LIMIT_ENVIRONMENT,
    ) as server:
        count = await recorded(database_url, profile_id, LARGE_SPOOL_LINES, 180)
        seconds = time.monotonic() - started
        peak = peak_resident_mib(server.process.pid)
        assert await server.terminate() == 0

    fault_figures["Costs spool: 100,000 lines replayed under a 256 MiB limit"] = {
        "spooled": LARGE_SPOOL_LINES,
        "spool_mib": spool_mib,
        "replayed": count,
        "lost": LARGE_SPOOL_LINES - count,
        "peak_rss_mib": peak,
        "seconds": round(seconds),
    }
    assert count == LARGE_SPOOL_LINES


async def test_a_torn_tail_and_a_poison_line_lose_nothing_acknowledged(
    database_url, tmp_path, fault_figures
):
    profile_id = new_profile_id()
    spool_path = tmp_path / "spool.jsonl"
    good = [spooled_line(profile_id, f"good-{n}") for n in range(1000)]
    # A negative quantity prices below zero, which the database's CHECK refuses for good.
    poison = spooled_line(profile_id, "poison", characters=-1000)
    torn = spooled_line(profile_id, "torn")[:50]  # a crash mid-append: never acknowledged
    append_durably(spool_path, b"".join(good[:500]) + poison + b"".join(good[500:]) + torn)

    async with server_process("costs", database_url, **spool_environment(spool_path)):
        count = await recorded(database_url, profile_id, len(good), 30)
    dead_letter = spool_path.with_name(spool_path.name + ".dead-letter")

    fault_figures["Costs spool: torn tail and poison line"] = {
        "spooled": len(good) + 1,
        "replayed": count,
        "lost": len(good) - count,
        "dead_lettered": dead_letter.read_bytes().count(b"\n"),
    }
    assert count == len(good)
    assert dead_letter.read_bytes() == poison
