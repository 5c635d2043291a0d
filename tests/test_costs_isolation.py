"""One profile's spend does not exist for another, through every costs.v1 RPC and in the
database itself."""

from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from costs.v1 import costs_pb2

from tests.conftest import as_profile, expect_status, new_profile_id, record_tts, timestamp

Code = grpc.StatusCode


@pytest.fixture
async def spender(costs_stub) -> tuple[tuple[str, str], ...]:
    """A profile with a recorded line and a monthly budget."""
    profile = as_profile(new_profile_id())
    await record_tts(costs_stub, profile, request_id="tts-a", characters=2000)
    await costs_stub.SetBudget(
        costs_pb2.SetBudgetRequest(period=costs_pb2.MONTHLY, limit_usd="5"), metadata=profile
    )
    return profile


async def test_other_profile_lists_no_entries(costs_stub, spender, profile):
    listed = await costs_stub.ListCostEntries(costs_pb2.ListCostEntriesRequest(), metadata=profile)
    assert not listed.entries


async def test_other_profile_summary_is_empty(costs_stub, spender, profile):
    now = datetime.now(UTC)
    result = await costs_stub.GetCostSummary(
        costs_pb2.GetCostSummaryRequest(
            start_time=timestamp(now - timedelta(days=1)),
            end_time=timestamp(now + timedelta(days=1)),
            group_by=[costs_pb2.PROVIDER],
        ),
        metadata=profile,
    )
    assert result.total_cost_usd == "0"
    assert not result.rows


async def test_other_profile_has_no_budget_and_no_spend(costs_stub, spender, profile):
    await expect_status(
        costs_stub.GetBudget(
            costs_pb2.GetBudgetRequest(period=costs_pb2.MONTHLY), metadata=profile
        ),
        Code.NOT_FOUND,
    )
    check = await costs_stub.CheckBudget(
        costs_pb2.CheckBudgetRequest(estimated_cost_usd="1"), metadata=profile
    )
    assert not check.budgets
    await costs_stub.SetBudget(
        costs_pb2.SetBudgetRequest(period=costs_pb2.MONTHLY, limit_usd="5"), metadata=profile
    )
    own = await costs_stub.GetBudget(
        costs_pb2.GetBudgetRequest(period=costs_pb2.MONTHLY), metadata=profile
    )
    assert own.spent_usd == "0"


async def test_other_profile_page_token_is_refused(costs_stub, spender, profile):
    await record_tts(costs_stub, spender)
    first = await costs_stub.ListCostEntries(
        costs_pb2.ListCostEntriesRequest(page_size=1), metadata=spender
    )
    await expect_status(
        costs_stub.ListCostEntries(
            costs_pb2.ListCostEntriesRequest(page_size=1, page_token=first.next_page_token),
            metadata=profile,
        ),
        Code.INVALID_ARGUMENT,
    )


async def test_other_profile_reusing_a_request_id_records_its_own_line(
    costs_stub, spender, profile
):
    theirs = await record_tts(costs_stub, spender, request_id="tts-a")
    mine = await record_tts(costs_stub, profile, request_id="tts-a")
    assert mine.entry_id != theirs.entry_id
    stream = await costs_stub.StreamUsage(
        iter(
            [
                costs_pb2.StreamUsageRequest(
                    lines=[
                        costs_pb2.UsageLine(
                            elevenlabs_tts=costs_pb2.RecordElevenLabsTTSRequest(
                                request_id="tts-a", model_id="eleven_v3", characters=1
                            )
                        )
                    ]
                )
            ]
        ),
        metadata=as_profile(new_profile_id()),
    )
    assert (stream.accepted, stream.duplicates) == (1, 0)


async def test_database_rows_of_other_profiles_are_invisible_to_the_service_role(
    costs_stub, spender, database_url
):
    """Row-level security holds even for a query that forgets its WHERE profile_id."""
    connection = await asyncpg.connect(database_url)
    try:
        async with connection.transaction():
            await connection.execute(
                "SELECT set_config('role', 'costs_service', true), "
                "set_config('app.profile_id', $1, true)",
                new_profile_id(),
            )
            counts = [
                await connection.fetchval(f"SELECT count(*) FROM costs.{table}")
                for table in ("entries", "daily_costs", "budgets", "budget_crossings")
            ]
    finally:
        await connection.close()
    assert counts == [0, 0, 0, 0]


async def test_call_without_profile_is_unauthenticated(costs_stub):
    await expect_status(costs_stub.ListPrices(costs_pb2.ListPricesRequest()), Code.UNAUTHENTICATED)
