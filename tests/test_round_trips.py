"""Round trips to the database per call, counted on the wire (bench/round_trips.py): Jobs' hot
calls, recording a cost line (priced with the catalog the process holds, recorded if that
catalog is still current) and the budget reads are each one statement in one round trip."""

import pytest

from bench.round_trips import measure

# Before the data-path work they were 3, 3, 4, 4, 6, 6, 4 and 4; recording was 2 until the
# catalog was kept in each process (Costs migration 0007).
HOT_CALLS = [
    "CreateJob",
    "GetJob",
    "UpdateJob",
    "CancelJob",
    "RecordElevenLabsTTS",
    "RecordGeminiUsage",
    "CheckBudget",
    "GetBudget",
]


@pytest.fixture(scope="module")
async def figures(database_url):
    return {figure.operation: figure for figure in await measure(database_url)}


@pytest.mark.parametrize("operation", HOT_CALLS)
async def test_a_hot_call_is_one_statement_in_one_round_trip(figures, operation):
    assert (figures[operation].round_trips, figures[operation].statements) == (1, 1)


async def test_every_hot_call_is_counted(figures):
    assert set(figures) == set(HOT_CALLS)
