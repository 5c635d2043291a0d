"""costs.v1.CostService budgets: status of the current period, CheckBudget before spending, and
alert thresholds logged once per crossing."""

import asyncio
import logging
from decimal import Decimal

import grpc
import pytest
from costs.v1 import costs_pb2

from tests.conftest import expect_status, record_tts

Code = grpc.StatusCode

# eleven_multilingual_v2 at $0.10 per 1,000 characters: 3,000 characters cost $0.30.
THIRTY_CENTS = {"model_id": "eleven_multilingual_v2", "characters": 3000}


async def set_budget(stub, profile, limit: str, *thresholds: int, period=costs_pb2.MONTHLY):
    request = costs_pb2.SetBudgetRequest(
        period=period, limit_usd=limit, alert_thresholds=thresholds
    )
    return await stub.SetBudget(request, metadata=profile)


def crossings(caplog: pytest.LogCaptureFixture, profile) -> list[str]:
    profile_id = profile[0][1]
    return [
        record.getMessage()
        for record in caplog.records
        if "budget crossed" in record.getMessage() and record.profile_id == profile_id
    ]


async def test_get_budget_reports_spend_of_the_current_period(costs_stub, profile):
    await set_budget(costs_stub, profile, "1.00")
    await record_tts(costs_stub, profile, **THIRTY_CENTS)
    status = await costs_stub.GetBudget(
        costs_pb2.GetBudgetRequest(period=costs_pb2.MONTHLY), metadata=profile
    )
    assert (status.limit_usd, status.spent_usd, status.remaining_usd) == ("1", "0.3", "0.7")
    assert status.state == costs_pb2.OK
    assert list(status.alert_thresholds) == [50, 80, 100]
    assert status.resets_at.ToDatetime().day == 1
    assert status.resets_at.ToDatetime() > status.period_start.ToDatetime()


@pytest.mark.parametrize(
    ("lines", "state"), [(1, costs_pb2.OK), (2, costs_pb2.WARNING), (4, costs_pb2.EXCEEDED)]
)
async def test_budget_state_follows_spend(costs_stub, profile, lines, state):
    await set_budget(costs_stub, profile, "1.00", period=costs_pb2.DAILY)
    for _ in range(lines):
        await record_tts(costs_stub, profile, **THIRTY_CENTS)
    status = await costs_stub.GetBudget(
        costs_pb2.GetBudgetRequest(period=costs_pb2.DAILY), metadata=profile
    )
    assert status.state == state


async def test_each_threshold_is_logged_once_when_crossed(costs_stub, profile, caplog):
    await set_budget(costs_stub, profile, "1.00", 50, 80, 100)
    with caplog.at_level(logging.WARNING):
        for _ in range(5):  # spend 0.30, 0.60, 0.90, 1.20, 1.50
            await record_tts(costs_stub, profile, **THIRTY_CENTS)
    assert crossings(caplog, profile) == [
        "MONTHLY budget crossed 50%: spent 0.60 of 1.00 USD",
        "MONTHLY budget crossed 80%: spent 0.90 of 1.00 USD",
        "MONTHLY budget crossed 100%: spent 1.20 of 1.00 USD",
    ]


async def test_concurrent_records_log_each_crossing_once(costs_stub, profile, caplog):
    await set_budget(costs_stub, profile, "1.00", 50, 100)
    with caplog.at_level(logging.WARNING):
        await asyncio.gather(*(record_tts(costs_stub, profile, **THIRTY_CENTS) for _ in range(8)))
    logged = crossings(caplog, profile)
    assert [message.split(":")[0] for message in logged] == [
        "MONTHLY budget crossed 50%",
        "MONTHLY budget crossed 100%",
    ]


async def test_check_budget_refuses_an_estimate_past_the_limit(costs_stub, profile):
    await set_budget(costs_stub, profile, "1.00")
    await record_tts(costs_stub, profile, **THIRTY_CENTS)
    fits = await costs_stub.CheckBudget(
        costs_pb2.CheckBudgetRequest(estimated_cost_usd="0.70"), metadata=profile
    )
    assert fits.allowed
    too_much = await costs_stub.CheckBudget(
        costs_pb2.CheckBudgetRequest(estimated_cost_usd="0.7000001"), metadata=profile
    )
    assert not too_much.allowed
    assert "MONTHLY budget" in too_much.reason
    assert [Decimal(b.spent_usd) for b in too_much.budgets] == [Decimal("0.3")]


async def test_check_budget_without_budgets_allows(costs_stub, profile):
    response = await costs_stub.CheckBudget(
        costs_pb2.CheckBudgetRequest(estimated_cost_usd="1000"), metadata=profile
    )
    assert response.allowed
    assert not response.budgets


async def test_recording_past_the_limit_is_never_refused(costs_stub, profile):
    await set_budget(costs_stub, profile, "0.01")
    entry = await record_tts(costs_stub, profile, **THIRTY_CENTS)
    assert entry.priced


async def test_get_budget_that_was_never_set_is_not_found(costs_stub, profile):
    details = await expect_status(
        costs_stub.GetBudget(costs_pb2.GetBudgetRequest(period=costs_pb2.DAILY), metadata=profile),
        Code.NOT_FOUND,
    )
    assert "SetBudget" in details


@pytest.mark.parametrize(
    ("request_message", "expected"),
    [
        (costs_pb2.SetBudgetRequest(limit_usd="10"), "period must be one of"),
        (costs_pb2.SetBudgetRequest(period=costs_pb2.MONTHLY, limit_usd="0"), "more than 0"),
        (costs_pb2.SetBudgetRequest(period=costs_pb2.MONTHLY, limit_usd="ten"), "decimal number"),
        (
            costs_pb2.SetBudgetRequest(
                period=costs_pb2.MONTHLY, limit_usd="10", alert_thresholds=[0]
            ),
            "percentages from 1 to 1000",
        ),
    ],
)
async def test_bad_budget_is_invalid(costs_stub, profile, request_message, expected):
    details = await expect_status(
        costs_stub.SetBudget(request_message, metadata=profile), Code.INVALID_ARGUMENT
    )
    assert expected in details


async def test_check_budget_with_bad_estimate_is_invalid(costs_stub, profile):
    details = await expect_status(
        costs_stub.CheckBudget(
            costs_pb2.CheckBudgetRequest(estimated_cost_usd="-1"), metadata=profile
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "estimated_cost_usd" in details
