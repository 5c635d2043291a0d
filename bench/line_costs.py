"""What a recorded cost line costs the database, and what of it each part of the schema costs:
`python -m bench.line_costs [--batches N] [--lines N] [--quick]`.

StreamUsage records a batch of lines in one statement (costs.record_priced). This measures
the CPU of the Postgres backend that runs it (its /proc counters: the WAL it writes and
flushes at commit included), per line, over N batches into a table already holding 50
batches, for the schema as migrated and for the same schema without parts a line pays for:
the three ListCostEntries filter indexes (provider, model, unpriced), then everything but the
unique (profile_id, request_id) key that makes each line count once, and the rollup trigger.
Each variant runs in a scratch database of its own on DATABASE_URL's server (or the embedded
one). The variants are measurements only: the schema the services run keeps every part.
"""

import argparse
import asyncio
import os
import uuid
from pathlib import Path

from costs.v1 import costs_pb2

from bench.load import process_tree_cpu_seconds
from services.costs.model import UsageLine
from services.costs.service import costs_definition
from services.costs.servicer import elevenlabs_line
from services.costs.store import CostStore
from services.runtime.database import TenantScopedPool, create_pool
from services.runtime.embedded_postgres import scratch_database, start_embedded_postgres
from services.runtime.server import migrate

REPO = Path(__file__).resolve().parent.parent
PROFILE = "bench-lines"
_FILTER_INDEXES = (
    "DROP INDEX costs.entries_by_provider_newest_first;"
    "DROP INDEX costs.entries_by_model_newest_first;"
    "DROP INDEX costs.entries_unpriced_newest_first;"
)
VARIANTS = {
    "as migrated": "",
    "without the 3 filter indexes": _FILTER_INDEXES,
    "only the unique request_id key, no rollup": _FILTER_INDEXES
    + "DROP INDEX costs.entries_newest_first;"
    "DROP INDEX costs.entries_of_job_newest_first;"
    "ALTER TABLE costs.entries DROP CONSTRAINT entries_pkey;"
    "DROP TRIGGER entries_rolled_up ON costs.entries;",
}


def _batch(lines: int) -> list[UsageLine]:
    """StreamUsage's lines as `make bench` sends them: ElevenLabs, a voice, a preview."""
    return [
        elevenlabs_line(
            costs_pb2.RecordElevenLabsTTSRequest(
                request_id=f"tts-{uuid.uuid4()}",
                model_id="eleven_flash_v2_5",
                voice_id="v1",
                characters=1200,
                text_preview="Hello",
            )
        )
        for _ in range(lines)
    ]


async def line_cost_us(admin_url: str, changes: str, batches: int, lines: int) -> float:
    """The backend's CPU per line, in µs, with `changes` made to the migrated schema."""
    async with scratch_database(admin_url, "bench_lines") as url:
        pool = await create_pool(url, min_size=1, max_size=1)
        try:
            definition = costs_definition()
            async with pool.acquire() as connection:
                await migrate(definition, connection)
                if changes:
                    await connection.execute(changes)
                backend = await connection.fetchval("SELECT pg_backend_pid()")
            store = CostStore(TenantScopedPool(pool, definition.database_role, service="costs"))
            for _ in range(50 if batches > 2 else 1):  # a table with lines in it already
                await store.record_many(PROFILE, _batch(lines))
            work = [_batch(lines) for _ in range(batches)]
            before = process_tree_cpu_seconds(backend)
            for batch in work:
                await store.record_many(PROFILE, batch)
            return (process_tree_cpu_seconds(backend) - before) / (batches * lines) * 1e6
        finally:
            await pool.close()


async def _run(batches: int, lines: int) -> None:
    admin_url = os.environ.get("DATABASE_URL") or start_embedded_postgres(
        REPO / ".data/bench-postgres"
    )
    print(f"{'schema':<45}{'database CPU per line':>24}")
    for name, changes in VARIANTS.items():
        cost = await line_cost_us(admin_url, changes, batches, lines)
        print(f"{name:<45}{cost:>21.1f} µs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=20, help="batches measured (default 20)")
    parser.add_argument("--lines", type=int, default=2000, help="lines a batch (default 2000)")
    parser.add_argument("--quick", action="store_true", help="2 batches of 100 lines: seconds")
    args = parser.parse_args()
    batches, lines = (2, 100) if args.quick else (args.batches, args.lines)
    asyncio.run(_run(batches, lines))


if __name__ == "__main__":
    main()
