"""costs.v1.CostService reading: summaries from the rollup and the ragged edges, paged lines,
and an exact total over a million lines."""

import shutil
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import grpc
import pytest
from costs.v1 import costs_pb2

from bench.seed import SYNTHETIC_LINE_COST, insert_synthetic_lines
from services.costs import service as costs_service_module
from services.runtime.embedded_postgres import scratch_database
from services.runtime.migrations import apply_migrations
from tests.conftest import (
    as_profile,
    expect_status,
    new_profile_id,
    record_gemini,
    record_tts,
    timestamp,
)

Code = grpc.StatusCode
COSTS_MIGRATIONS = Path(costs_service_module.__file__).parent / "migrations"
MAY = datetime(2025, 5, 1, tzinfo=UTC)


async def summary(stub, profile, start, end, *group_by, job_id: str = "") -> costs_pb2.CostSummary:
    request = costs_pb2.GetCostSummaryRequest(
        start_time=timestamp(start), end_time=timestamp(end), group_by=group_by, job_id=job_id
    )
    return await stub.GetCostSummary(request, metadata=profile)


def at(day: int, hour: int = 12) -> datetime:
    return MAY.replace(day=day, hour=hour)


async def test_summary_groups_by_provider_and_model(costs_stub, profile):
    await record_tts(costs_stub, profile, characters=1000, occurred_at=timestamp(at(2)))
    await record_tts(costs_stub, profile, characters=3000, occurred_at=timestamp(at(3)))
    await record_gemini(
        costs_stub,
        profile,
        model="gemini-2.0-flash",
        prompt_tokens=1_000_000,
        occurred_at=timestamp(at(3)),
    )
    result = await summary(
        costs_stub, profile, MAY, MAY + timedelta(days=31), costs_pb2.PROVIDER, costs_pb2.MODEL
    )
    rows = {(r.provider, r.model): (Decimal(r.cost_usd), r.line_count) for r in result.rows}
    assert rows == {
        ("elevenlabs", "eleven_flash_v2_5"): (Decimal("0.20"), 2),
        ("gemini", "gemini-2.0-flash"): (Decimal("0.10"), 1),
    }
    assert Decimal(result.total_cost_usd) == Decimal("0.30")


async def test_summary_of_a_range_cutting_through_days_counts_only_lines_inside_it(
    costs_stub, profile
):
    for day, hour in [(1, 10), (1, 13), (2, 12), (3, 22), (3, 23)]:
        await record_tts(costs_stub, profile, characters=1000, occurred_at=timestamp(at(day, hour)))
    result = await summary(
        costs_stub, profile, at(1, 12), at(3, 22).replace(minute=30), costs_pb2.DAY
    )
    days = {r.day: r.line_count for r in result.rows}
    assert days == {"2025-05-01": 1, "2025-05-02": 1, "2025-05-03": 1}
    assert Decimal(result.total_cost_usd) == Decimal("0.15")


async def test_summary_by_month_and_job_with_a_job_filter(costs_stub, profile):
    job, other_job = str(uuid.uuid4()), str(uuid.uuid4())
    await record_tts(costs_stub, profile, job_id=job, occurred_at=timestamp(at(30)))
    await record_tts(
        costs_stub, profile, job_id=job, occurred_at=timestamp(at(31) + timedelta(days=1))
    )
    await record_tts(costs_stub, profile, job_id=other_job, occurred_at=timestamp(at(30)))
    result = await summary(
        costs_stub,
        profile,
        MAY,
        MAY + timedelta(days=61),
        costs_pb2.MONTH,
        costs_pb2.JOB,
        job_id=job,
    )
    assert [(r.month, r.job_id, r.cost_usd) for r in result.rows] == [
        ("2025-05", job, "0.05"),
        ("2025-06", job, "0.05"),
    ]


async def test_unpriced_usage_is_shown_apart_from_the_total(costs_stub, profile):
    await record_tts(costs_stub, profile, characters=1000, occurred_at=timestamp(at(5)))
    await record_gemini(
        costs_stub, profile, model="gemini-9-ultra", prompt_tokens=7, occurred_at=timestamp(at(5))
    )
    result = await summary(costs_stub, profile, MAY, at(6), costs_pb2.MODEL)
    assert Decimal(result.total_cost_usd) == Decimal("0.05")
    assert [r.model for r in result.rows] == ["eleven_flash_v2_5"]
    assert [(r.model, r.line_count) for r in result.unpriced_rows] == [("gemini-9-ultra", 1)]
    assert result.unpriced_line_count == 1


async def test_a_million_tiny_costs_add_up_to_the_exact_total(costs_stub, database_url):
    profile_id = new_profile_id()
    connection = await asyncpg.connect(database_url)
    try:
        await insert_synthetic_lines(connection, profile_id, 1_000_000, MAY)
    finally:
        await connection.close()
    result = await summary(
        costs_stub, (("x-profile-id", profile_id),), MAY, MAY + timedelta(days=31), costs_pb2.DAY
    )
    assert Decimal(result.total_cost_usd) == SYNTHETIC_LINE_COST * 1_000_000 == Decimal("0.1")
    assert sum(r.line_count for r in result.rows) == 1_000_000


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, "start_time and end_time are required"),
        ({"start_time": timestamp(at(2)), "end_time": timestamp(at(1))}, "end_time must be after"),
        (
            {"start_time": timestamp(at(1)), "end_time": timestamp(at(2)), "group_by": [0]},
            "group_by entries must be among",
        ),
    ],
)
async def test_bad_summary_request_is_invalid(costs_stub, profile, fields, expected):
    details = await expect_status(
        costs_stub.GetCostSummary(costs_pb2.GetCostSummaryRequest(**fields), metadata=profile),
        Code.INVALID_ARGUMENT,
    )
    assert expected in details


async def list_all(stub, profile, **filters) -> list[costs_pb2.CostEntry]:
    entries, token = [], ""
    while True:
        page = await stub.ListCostEntries(
            costs_pb2.ListCostEntriesRequest(page_size=2, page_token=token, **filters),
            metadata=profile,
        )
        entries.extend(page.entries)
        token = page.next_page_token
        if not token:
            return entries


async def test_list_cost_entries_pages_newest_first(costs_stub, profile):
    recorded = [
        await record_tts(costs_stub, profile, occurred_at=timestamp(at(day))) for day in range(1, 6)
    ]
    listed = await list_all(costs_stub, profile)
    assert [e.entry_id for e in listed] == [e.entry_id for e in reversed(recorded)]


async def test_list_cost_entries_filters_by_provider_and_unpriced(costs_stub, profile):
    await record_tts(costs_stub, profile)
    gemini = await record_gemini(costs_stub, profile, prompt_tokens=10)
    unpriced = await record_gemini(costs_stub, profile, model="gemini-9-ultra", prompt_tokens=1)
    by_provider = await list_all(costs_stub, profile, provider="gemini")
    assert {e.entry_id for e in by_provider} == {gemini.entry_id, unpriced.entry_id}
    only_unpriced = await list_all(costs_stub, profile, unpriced_only=True)
    assert [e.entry_id for e in only_unpriced] == [unpriced.entry_id]


async def test_page_token_reused_with_other_filters_is_invalid(costs_stub, profile):
    for _ in range(3):
        await record_tts(costs_stub, profile)
    first = await costs_stub.ListCostEntries(
        costs_pb2.ListCostEntriesRequest(page_size=1), metadata=profile
    )
    details = await expect_status(
        costs_stub.ListCostEntries(
            costs_pb2.ListCostEntriesRequest(
                page_size=1, page_token=first.next_page_token, provider="gemini"
            ),
            metadata=profile,
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "other filters" in details


async def test_summary_by_voice_splits_whole_days_and_edges_alike(costs_stub):
    """Lines of two voices on whole days (from the rollup) and at the range's ragged edges
    (from the lines), and a Gemini line, which has no voice."""
    profile = as_profile(new_profile_id())
    for day, hour, voice in [(1, 23, "v-a"), (2, 12, "v-a"), (2, 13, "v-b"), (3, 1, "v-b")]:
        await record_tts(
            costs_stub,
            profile,
            characters=1000,
            voice_id=voice,
            occurred_at=timestamp(at(day, hour)),
        )
    await record_gemini(
        costs_stub,
        profile,
        model="gemini-2.0-flash",
        prompt_tokens=1_000_000,
        occurred_at=timestamp(at(2)),
    )
    result = await summary(
        costs_stub, profile, at(1, 22), at(3, 2), costs_pb2.PROVIDER, costs_pb2.VOICE
    )
    rows = {(r.provider, r.voice_id): (Decimal(r.cost_usd), r.line_count) for r in result.rows}
    assert rows == {
        ("elevenlabs", "v-a"): (Decimal("0.10"), 2),
        ("elevenlabs", "v-b"): (Decimal("0.10"), 2),
        ("gemini", ""): (Decimal("0.10"), 1),
    }


async def test_a_rollup_made_before_voices_is_rebuilt_by_voice(admin_database_url, tmp_path):
    """Migration 0008 rebuilds the daily rollup from the lines: rows rolled up before it
    (without a voice) are split by voice, with the same totals."""
    folder = tmp_path / "migrations"
    folder.mkdir()
    for path in sorted(COSTS_MIGRATIONS.glob("*.sql")):
        if int(path.name[:4]) < 8:
            shutil.copy(path, folder)
    async with scratch_database(admin_database_url, "voices") as url:
        connection = await asyncpg.connect(url)
        try:
            await apply_migrations(connection, "costs", folder)
            async with connection.transaction():
                await connection.execute("SELECT set_config('app.profile_id', 'store-v', true)")
                await connection.execute(
                    """
                    INSERT INTO costs.entries (profile_id, request_id, provider, model,
                        occurred_at, usage, cost_usd, priced, applied_prices, attributes)
                    SELECT 'store-v', 'r' || n, 'elevenlabs', 'm', '2025-05-02 12:00+00',
                        '{}', 0.25, true, '[]',
                        jsonb_build_object('voice_id', CASE WHEN n < 3 THEN 'v-a' ELSE 'v-b' END)
                    FROM generate_series(1, 4) AS n
                    """
                )
            before = await connection.fetch("SELECT cost_usd, line_count FROM costs.daily_costs")
            shutil.copy(COSTS_MIGRATIONS / "0008_voice_rollup.sql", folder)
            assert await apply_migrations(connection, "costs", folder) == [8]
            async with connection.transaction():
                await connection.execute("SELECT set_config('app.profile_id', 'store-v', true)")
                after = await connection.fetch(
                    "SELECT voice_id, cost_usd, line_count FROM costs.daily_costs ORDER BY 1"
                )
        finally:
            await connection.close()
    assert [(row["cost_usd"], row["line_count"]) for row in before] == [(Decimal("1.00"), 4)]
    assert [tuple(row) for row in after] == [
        ("v-a", Decimal("0.50"), 2),
        ("v-b", Decimal("0.50"), 2),
    ]
