"""Money and quantities on the wire: a decimal string of at most 15 digits before the point
and 18 after is kept exactly, through Postgres and every sum and comparison; anything beyond
that, or not plain decimal notation, is INVALID_ARGUMENT naming the field."""

from datetime import UTC, datetime
from decimal import Decimal

import grpc
import pytest
from costs.v1 import costs_pb2

from services.costs.model import Budget, BudgetPeriod, BudgetStatus
from services.costs.servicer import decimal_text
from tests.conftest import expect_status

Code = grpc.StatusCode
LONGEST = "999999999999999.999999999999999999"  # 15 digits, a point, 18 digits
DIGITS_RULE = "may have at most 15 digits before the decimal point and 18 after it"


def _budget(limit: str) -> costs_pb2.SetBudgetRequest:
    return costs_pb2.SetBudgetRequest(period=costs_pb2.MONTHLY, limit_usd=limit)


def _usage(quantity: str) -> costs_pb2.RecordUsageRequest:
    return costs_pb2.RecordUsageRequest(
        request_id="r", provider="acme", model="m", unit="seconds", quantity=quantity
    )


async def test_longest_budget_limit_is_stored_and_answered_exactly(costs_stub, profile):
    set_status = await costs_stub.SetBudget(_budget(LONGEST), metadata=profile)
    got = await costs_stub.GetBudget(
        costs_pb2.GetBudgetRequest(period=costs_pb2.MONTHLY), metadata=profile
    )
    assert (set_status.limit_usd, set_status.remaining_usd) == (LONGEST, LONGEST)
    assert (got.limit_usd, got.remaining_usd) == (LONGEST, LONGEST)


@pytest.mark.parametrize(
    "limit",
    ["1000000000000000", "0.0000000000000000001", "1e15", "123456789012345.1234567890123456789"],
    ids=["16_integer_digits", "19_fraction_digits", "exponent_16_digits", "both"],
)
async def test_budget_limit_beyond_the_digits_kept_is_invalid_argument(costs_stub, profile, limit):
    details = await expect_status(
        costs_stub.SetBudget(_budget(limit), metadata=profile), Code.INVALID_ARGUMENT
    )
    assert details.startswith(f"limit_usd {DIGITS_RULE}")


async def test_trailing_zeros_past_the_eighteenth_place_are_not_refused(costs_stub, profile):
    status = await costs_stub.SetBudget(_budget("12.5" + "0" * 30), metadata=profile)
    assert status.limit_usd == "12.5"


async def test_estimate_equal_to_the_longest_limit_fits_it_exactly(costs_stub, profile):
    """0 spent + the estimate, compared with the limit: at 28 digits (Python's default
    context) the sum would round up to 10^15 and be refused."""
    await costs_stub.SetBudget(_budget(LONGEST), metadata=profile)
    answer = await costs_stub.CheckBudget(
        costs_pb2.CheckBudgetRequest(estimated_cost_usd=LONGEST), metadata=profile
    )
    assert answer.allowed


async def test_estimate_beyond_the_digits_kept_is_invalid_argument(costs_stub, profile):
    request = costs_pb2.CheckBudgetRequest(estimated_cost_usd="0." + "0" * 18 + "1")
    details = await expect_status(
        costs_stub.CheckBudget(request, metadata=profile), Code.INVALID_ARGUMENT
    )
    assert details.startswith(f"estimated_cost_usd {DIGITS_RULE}")


async def test_longest_quantity_is_recorded_exactly(costs_stub, profile):
    response = await costs_stub.RecordUsage(
        _usage("123456789012345.123456789012345678"), metadata=profile
    )
    assert response.entry.usage["seconds"] == "123456789012345.123456789012345678"


async def test_quantity_beyond_the_digits_kept_is_invalid_argument(costs_stub, profile):
    details = await expect_status(
        costs_stub.RecordUsage(_usage("1" * 16), metadata=profile), Code.INVALID_ARGUMENT
    )
    assert details.startswith(f"quantity {DIGITS_RULE}")


@pytest.mark.parametrize(
    "text",
    ["1_000", "\u0661\u0662", "NaN", "Infinity", "0x10", "1e99999999999999999999", "1" * 65],
    ids=["underscore", "arabic_indic_digits", "nan", "infinity", "hex", "huge_exponent", "long"],
)
async def test_money_that_is_not_plain_decimal_notation_is_invalid_argument(
    costs_stub, profile, text
):
    details = await expect_status(
        costs_stub.SetBudget(_budget(text), metadata=profile), Code.INVALID_ARGUMENT
    )
    assert details.startswith('limit_usd must be a decimal number such as "12.50"')


def test_budget_arithmetic_is_exact_at_the_longest_values():
    limit = Decimal(LONGEST)
    now = datetime.now(UTC)
    status = BudgetStatus(
        Budget(BudgetPeriod.MONTHLY, limit, (50, 100)), Decimal("0.000000000000000001"), now, now
    )
    assert status.remaining_usd == Decimal("999999999999999.999999999999999998")
    assert status.allows(Decimal("999999999999999.999999999999999998"))
    assert not status.allows(limit)


def test_reply_text_of_a_long_decimal_is_exact():
    assert decimal_text(Decimal(LONGEST + "000")) == LONGEST
