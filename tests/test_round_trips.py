"""Round trips to the database per call, counted on the wire (bench/round_trips.py): Jobs' hot
calls and the budget reads are one statement in one round trip, recording a cost line two (the
prices, then the line); no call sends more than that."""

import pytest

from bench.round_trips import measure

# Round trips per call: before the data-path work they were 3, 3, 4, 4, 6, 6, 4 and 4.
MOST = {
    "CreateJob": 1,
    "GetJob": 1,
    "UpdateJob": 1,
    "CancelJob": 1,
    "RecordElevenLabsTTS": 2,
    "RecordGeminiUsage": 2,
    "CheckBudget": 1,
    "GetBudget": 1,
}
ONE_STATEMENT = [name for name, most in MOST.items() if most == 1]


@pytest.fixture(scope="module")
async def figures(database_url):
    return {figure.operation: figure for figure in await measure(database_url)}


@pytest.mark.parametrize("operation", ONE_STATEMENT)
async def test_a_hot_call_is_one_statement_in_one_round_trip(figures, operation):
    assert (figures[operation].round_trips, figures[operation].statements) == (1, 1)


@pytest.mark.parametrize("operation", ["RecordElevenLabsTTS", "RecordGeminiUsage"])
async def test_recording_a_line_is_two_statements_in_two_round_trips(figures, operation):
    assert (figures[operation].round_trips, figures[operation].statements) == (2, 2)


async def test_no_call_takes_more_round_trips_than_its_most(figures):
    assert {name: figure.round_trips for name, figure in figures.items()} == {
        name: min(figures[name].round_trips, most) for name, most in MOST.items()
    }
