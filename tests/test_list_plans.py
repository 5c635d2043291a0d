"""Every filter a caller can ask of ListJobs and ListCostEntries is an index range scan with
LIMIT: the plans Postgres makes for the stores' own queries, over a profile with 15,000 jobs
and lines among other profiles' and statistics gathered by ANALYZE."""

import json
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from services.costs.model import EntryFilter
from services.costs.service import costs_definition
from services.costs.store import entries_query
from services.jobs.model import JobFilter, JobStatus
from services.jobs.service import JOBS
from services.jobs.store import list_query, list_query_by_bytes
from services.runtime.database import TenantScopedPool, create_pool
from services.runtime.embedded_postgres import scratch_database
from services.runtime.migrations import apply_migrations
from services.runtime.paging import reply_budget
from services.runtime.settings import Settings

BUSY = "busy"
ROWS = 20_000  # three in four are BUSY's
REPLY_BYTES = reply_budget(Settings.max_message_bytes)

# Values in one row of about forty: an index on them finds a page without walking BUSY's
# other rows, and there are too many of them to sort.
_SEED_JOBS = f"""
    INSERT INTO jobs.jobs (profile_id, kind, status, create_time)
    SELECT CASE WHEN g % 4 = 0 THEN 'other-' || g % 50 ELSE '{BUSY}' END,
           CASE WHEN g % 40 = 1 THEN 'rare' ELSE 'render-' || g % 7 END,
           CASE WHEN g % 37 = 1 THEN 'PROCESSING' WHEN g % 23 = 1 THEN 'FAILED'
                ELSE 'COMPLETED' END,
           now() - ({ROWS} - g) * interval '1 second'
    FROM generate_series(1, {ROWS}) AS g;
    ANALYZE jobs.jobs;
"""
_SEED_ENTRIES = f"""
    INSERT INTO costs.entries (profile_id, entry_id, request_id, provider, model, job_id,
                               occurred_at, priced)
    SELECT CASE WHEN g % 4 = 0 THEN 'other-' || g % 50 ELSE '{BUSY}' END, gen_random_uuid(),
           'r-' || g,
           CASE WHEN g % 41 = 1 THEN 'rare-ai' WHEN g % 2 = 0 THEN 'gemini'
                ELSE 'elevenlabs' END,
           CASE WHEN g % 43 = 1 THEN 'rare-model' WHEN g % 2 = 0 THEN 'gemini-2.5-flash'
                ELSE 'eleven_flash_v2_5' END,
           CASE WHEN g % 45 = 1 THEN '{uuid.UUID(int=1)}'::uuid END,
           now() - ({ROWS} - g) * interval '1 second',
           g % 47 <> 1
    FROM generate_series(1, {ROWS}) AS g;
    ANALYZE costs.entries;
"""


@pytest.fixture(scope="module")
async def seeded_url(admin_database_url: str) -> AsyncIterator[str]:
    async with scratch_database(admin_database_url, "plans") as url:
        connection = await asyncpg.connect(url)
        try:
            for definition, seed in ((JOBS, _SEED_JOBS), (costs_definition(), _SEED_ENTRIES)):
                await apply_migrations(connection, definition.name, definition.migrations)
                await connection.execute(seed)
        finally:
            await connection.close()
        yield url


async def _plan(url: str, role: str, query: str, arguments: list) -> dict:
    """The plan Postgres makes for the query, as the service's role, scoped to BUSY."""
    pool = TenantScopedPool(await create_pool(url, max_size=1), role)
    try:
        async with pool.transaction(BUSY, readonly=True) as connection:
            plan = await connection.fetchval(f"EXPLAIN (FORMAT JSON) {query}", *arguments)
    finally:
        await pool.pool.close()
    return (json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]


def _nodes(plan: dict) -> Iterator[dict]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


def _assert_index_range_scans(plan: dict, index: str) -> None:
    nodes = list(_nodes(plan))
    kinds = {node["Node Type"] for node in nodes}
    assert not kinds & {"Seq Scan", "Sort", "Bitmap Heap Scan", "Incremental Sort"}, kinds
    scans = {node.get("Index Name") for node in nodes if "Relation Name" in node}
    assert scans == {index}
    assert plan["Node Type"] in ("Limit", "Subquery Scan")


@pytest.mark.parametrize(
    ("job_filter", "index"),
    [
        (JobFilter(), "jobs_newest_first"),
        (JobFilter(kind="rare"), "jobs_by_kind_status_newest_first"),
        (
            JobFilter(kind="rare", statuses=(JobStatus.COMPLETED,)),
            "jobs_by_kind_status_newest_first",
        ),
        (JobFilter(statuses=(JobStatus.PROCESSING,)), "jobs_by_status_newest_first"),
        (
            JobFilter(statuses=(JobStatus.FAILED, JobStatus.PROCESSING)),
            "jobs_by_status_newest_first",
        ),
    ],
    ids=["none", "kind", "kind-and-status", "status", "statuses"],
)
@pytest.mark.parametrize("by_bytes", [False, True], ids=["first-read", "read-by-bytes"])
async def test_a_list_jobs_filter_is_an_index_range_scan(seeded_url, job_filter, index, by_bytes):
    if by_bytes:
        query, arguments = list_query_by_bytes(BUSY, job_filter, 50, None, REPLY_BYTES)
    else:
        query, arguments = list_query(BUSY, job_filter, 50, None)
    _assert_index_range_scans(await _plan(seeded_url, "jobs_service", query, arguments), index)


@pytest.mark.parametrize(
    ("entry_filter", "index"),
    [
        (EntryFilter(), "entries_newest_first"),
        (EntryFilter(job_id=uuid.UUID(int=1)), "entries_of_job_newest_first"),
        (EntryFilter(provider="rare-ai"), "entries_by_provider_newest_first"),
        (EntryFilter(model="rare-model"), "entries_by_model_newest_first"),
        (EntryFilter(unpriced_only=True), "entries_unpriced_newest_first"),
    ],
    ids=["none", "job", "provider", "model", "unpriced"],
)
async def test_a_list_cost_entries_filter_is_an_index_range_scan(seeded_url, entry_filter, index):
    query, arguments = entries_query(BUSY, entry_filter, 51, None)
    _assert_index_range_scans(await _plan(seeded_url, "costs_service", query, arguments), index)
