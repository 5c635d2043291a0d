"""Round trips to the database per call, counted on the wire (bench/round_trips.py): each of
Jobs' hot calls is one statement, one round trip; no call sends more than it did when this
test was written."""

import pytest

from bench.round_trips import measure

# Round trips per call before the data-path work; a call may only get cheaper.
MOST = {
    "CreateJob": 1,
    "GetJob": 1,
    "UpdateJob": 1,
    "CancelJob": 1,
    "RecordElevenLabsTTS": 6,
    "RecordGeminiUsage": 6,
    "CheckBudget": 4,
    "GetBudget": 4,
}


@pytest.fixture(scope="module")
async def figures(database_url):
    return {figure.operation: figure for figure in await measure(database_url)}


@pytest.mark.parametrize("operation", ["CreateJob", "GetJob", "UpdateJob", "CancelJob"])
async def test_a_hot_jobs_call_is_one_statement_in_one_round_trip(figures, operation):
    assert (figures[operation].round_trips, figures[operation].statements) == (1, 1)


async def test_no_call_takes_more_round_trips_than_before(figures):
    assert {name: figure.round_trips for name, figure in figures.items()} == {
        name: min(figures[name].round_trips, most) for name, most in MOST.items()
    }
