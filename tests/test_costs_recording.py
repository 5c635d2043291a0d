"""costs.v1.CostService recording: idempotency, pricing by catalog version, tiers, unpriced
models, exact money and answers to bad input."""

import asyncio
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import asyncpg
import grpc
import pytest
from costs.v1 import costs_pb2

from services.costs.model import read_catalog
from services.costs.service import PRICE_CATALOG, load_price_catalog
from tests.conftest import (
    as_profile,
    expect_status,
    new_profile_id,
    record_gemini,
    record_tts,
    request_id,
    timestamp,
)

Code = grpc.StatusCode


async def test_elevenlabs_line_is_priced_per_thousand_characters(costs_stub, profile):
    entry = await record_tts(
        costs_stub, profile, characters=1234, model_id="eleven_multilingual_v2"
    )
    assert Decimal(entry.cost_usd) == Decimal("0.1234")
    assert entry.priced
    assert entry.provider == "elevenlabs"
    assert entry.usage["characters"] == "1234"
    assert [p.effective_from for p in entry.applied_prices] == ["2025-01-01"]


async def test_elevenlabs_text_preview_is_cut_to_100_characters(costs_stub, profile):
    entry = await record_tts(costs_stub, profile, text_preview="x" * 500, credits_charged=617)
    assert entry.attributes["text_preview"] == "x" * 100
    assert entry.usage["credits_charged"] == "617"


async def test_entry_ids_are_uuid7s_carrying_the_millisecond_of_recording(costs_stub, profile):
    before_ms = int(datetime.now(UTC).timestamp() * 1000)
    entry = await record_tts(costs_stub, profile)
    after_ms = int(datetime.now(UTC).timestamp() * 1000) + 1
    entry_id = uuid.UUID(entry.entry_id)
    assert entry_id.version == 7
    assert entry_id.variant == uuid.RFC_4122
    assert before_ms <= entry_id.int >> 80 <= after_ms


async def test_same_request_id_twice_records_once_and_returns_the_first_line(costs_stub, profile):
    first = await record_tts(costs_stub, profile, request_id="tts-1", characters=100)
    second = await record_tts(costs_stub, profile, request_id="tts-1", characters=999)
    assert second.entry_id == first.entry_id
    assert second.cost_usd == first.cost_usd
    listed = await costs_stub.ListCostEntries(costs_pb2.ListCostEntriesRequest(), metadata=profile)
    assert len(listed.entries) == 1


async def test_concurrent_duplicates_record_once(costs_stub, profile):
    entries = await asyncio.gather(
        *(record_tts(costs_stub, profile, request_id="same", characters=10) for _ in range(20))
    )
    assert len({e.entry_id for e in entries}) == 1
    listed = await costs_stub.ListCostEntries(costs_pb2.ListCostEntriesRequest(), metadata=profile)
    assert len(listed.entries) == 1


async def test_same_request_id_in_two_profiles_records_two_lines(costs_stub):
    a = await record_tts(costs_stub, as_profile(new_profile_id()), request_id="shared")
    b = await record_tts(costs_stub, as_profile(new_profile_id()), request_id="shared")
    assert a.entry_id != b.entry_id


async def test_gemini_thinking_tokens_are_billed_at_the_output_rate(costs_stub, profile):
    entry = await record_gemini(
        costs_stub, profile, prompt_tokens=1_000_000, output_tokens=600_000, thinking_tokens=400_000
    )
    # 1M input at $0.30 + (600K output + 400K thinking) at $2.50 per 1M.
    assert Decimal(entry.cost_usd) == Decimal("2.80")
    assert entry.usage["thinking_tokens"] == "400000"


async def test_gemini_cached_and_audio_tokens_have_their_own_rates(costs_stub, profile):
    entry = await record_gemini(
        costs_stub,
        profile,
        prompt_tokens=1_000_000,
        cached_tokens=500_000,
        audio_input_tokens=200_000,
    )
    # 300K text at $0.30, 500K cached at $0.03, 200K audio at $1.00 per 1M.
    assert Decimal(entry.cost_usd) == Decimal("0.09") + Decimal("0.015") + Decimal("0.2")
    billed = {p.usage_type: p.quantity for p in entry.applied_prices}
    assert billed == {
        "input_tokens": "300000",
        "cached_tokens": "500000",
        "audio_input_tokens": "200000",
    }


@pytest.mark.parametrize(
    ("prompt_tokens", "expected"),
    [
        # $1.25 in / $10 out per 1M up to 200K prompt tokens.
        (200_000, Decimal("0.25") + Decimal("1.00")),
        # $2.50 in / $15 out per 1M above.
        (200_001, Decimal("0.5000025") + Decimal("1.50")),
    ],
)
async def test_gemini_pro_prompts_above_200k_tokens_use_the_higher_tier(
    costs_stub, profile, prompt_tokens, expected
):
    entry = await record_gemini(
        costs_stub,
        profile,
        model="gemini-2.5-pro",
        prompt_tokens=prompt_tokens,
        output_tokens=100_000,
    )
    assert Decimal(entry.cost_usd) == expected


async def test_unknown_model_is_recorded_unpriced(costs_stub, profile):
    entry = await record_gemini(costs_stub, profile, model="gemini-9-ultra", prompt_tokens=500)
    assert not entry.priced
    assert Decimal(entry.cost_usd) == 0
    assert entry.usage["prompt_tokens"] == "500"


async def test_line_before_a_model_had_a_price_is_unpriced(costs_stub, profile):
    # gemini-2.5-flash-lite is in the catalog from 2025-07-22 on.
    entry = await record_gemini(
        costs_stub,
        profile,
        model="gemini-2.5-flash-lite",
        prompt_tokens=10,
        occurred_at=timestamp(datetime(2025, 7, 21, 23, 59, tzinfo=UTC)),
    )
    assert not entry.priced


async def add_prices(
    connection: asyncpg.Connection,
    provider: str,
    *rows: tuple[str, str, str, Decimal, date],
) -> None:
    """Catalog rows (model, usage_type, unit, unit price per 1 unit, effective from) of a
    provider, added as an operator would, in SQL."""
    await connection.executemany(
        """
        INSERT INTO costs.prices (provider, model, usage_type, unit, per, unit_price_usd,
            prompt_tokens_over, effective_from, source, checked_on)
        VALUES ($1, $2, $3, $4, 1, $5, 0, $6, 'test', '2025-01-01')
        """,
        [(provider, *row) for row in rows],
    )


@pytest.fixture(scope="module")
async def acme_prices(costs_service, database_url: str) -> str:
    """Two versions of a price for a provider of the tests' own, added as an operator would."""
    connection = await asyncpg.connect(database_url)
    try:
        await add_prices(
            connection,
            "acme",
            ("voice-1", "seconds", "second", Decimal("0.010"), date(2025, 1, 1)),
            ("voice-1", "seconds", "second", Decimal("0.015"), date(2025, 3, 1)),
        )
    finally:
        await connection.close()
    return "acme"


@pytest.mark.parametrize(
    ("occurred_at", "unit_price"),
    [
        (datetime(2025, 2, 28, 23, 59, 59, tzinfo=UTC), "0.01"),
        (datetime(2025, 3, 1, 0, 0, tzinfo=UTC), "0.015"),
    ],
)
async def test_line_is_priced_with_the_price_in_effect_when_it_occurred(
    costs_stub, profile, acme_prices, occurred_at, unit_price
):
    request = costs_pb2.RecordUsageRequest(
        request_id=request_id(),
        provider=acme_prices,
        model="voice-1",
        unit="seconds",
        quantity="12.5",
        occurred_at=timestamp(occurred_at),
    )
    entry = (await costs_stub.RecordUsage(request, metadata=profile)).entry
    assert entry.applied_prices[0].unit_price_usd == unit_price
    assert Decimal(entry.cost_usd) == Decimal("12.5") * Decimal(unit_price)


async def test_list_prices_shows_the_catalog_with_sources(costs_stub, profile):
    response = await costs_stub.ListPrices(
        costs_pb2.ListPricesRequest(provider="gemini"), metadata=profile
    )
    pro_output = {
        (p.prompt_tokens_over, p.unit_price_usd)
        for p in response.prices
        if p.model == "gemini-2.5-pro" and p.usage_type == "output_tokens"
    }
    assert pro_output == {(0, "10"), (200_000, "15")}
    assert all(p.source and p.checked_on for p in response.prices)
    assert {p.provider for p in response.prices} == {"gemini"}


async def test_many_tiny_costs_add_up_to_the_exact_total(costs_stub, profile):
    requests = [
        costs_pb2.StreamUsageRequest(
            lines=[
                costs_pb2.UsageLine(
                    gemini=costs_pb2.RecordGeminiUsageRequest(
                        request_id=f"tiny-{n}", model="gemini-2.5-flash-lite", prompt_tokens=1
                    )
                )
            ]
        )
        for n in range(3000)
    ]
    response = await costs_stub.StreamUsage(iter(requests), metadata=profile)
    assert (response.accepted, response.duplicates) == (3000, 0)
    summary = await costs_stub.GetCostSummary(
        costs_pb2.GetCostSummaryRequest(
            start_time=timestamp(datetime.now(UTC) - timedelta(days=1)),
            end_time=timestamp(datetime.now(UTC) + timedelta(days=1)),
        ),
        metadata=profile,
    )
    # 3000 tokens at $0.10 per 1M; a float sum of 3000 x 1e-7 is not 0.0003.
    assert Decimal(summary.total_cost_usd) == Decimal("0.0003")


async def test_future_occurred_at_is_invalid(costs_stub, profile):
    details = await expect_status(
        costs_stub.RecordGeminiUsage(
            costs_pb2.RecordGeminiUsageRequest(
                request_id=request_id(),
                model="gemini-2.5-flash",
                occurred_at=timestamp(datetime.now(UTC) + timedelta(hours=1)),
            ),
            metadata=profile,
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "is in the future" in details


@pytest.mark.parametrize(
    ("request_message", "expected"),
    [
        (costs_pb2.RecordElevenLabsTTSRequest(model_id="eleven_v3"), "request_id"),
        (costs_pb2.RecordElevenLabsTTSRequest(request_id="r"), "model_id"),
        (
            costs_pb2.RecordElevenLabsTTSRequest(request_id="r", model_id="m", characters=-1),
            "characters must not be negative",
        ),
        (
            costs_pb2.RecordElevenLabsTTSRequest(request_id="r", model_id="m", job_id="job-7"),
            "job_id must be a Jobs job UUID",
        ),
    ],
)
async def test_bad_elevenlabs_record_is_invalid(costs_stub, profile, request_message, expected):
    details = await expect_status(
        costs_stub.RecordElevenLabsTTS(request_message, metadata=profile), Code.INVALID_ARGUMENT
    )
    assert expected in details


async def test_gemini_cached_tokens_beyond_the_prompt_are_invalid(costs_stub, profile):
    details = await expect_status(
        costs_stub.RecordGeminiUsage(
            costs_pb2.RecordGeminiUsageRequest(
                request_id="r", model="gemini-2.5-flash", prompt_tokens=10, cached_tokens=11
            ),
            metadata=profile,
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "must not exceed prompt_tokens" in details


@pytest.mark.parametrize("quantity", ["", "abc", "-1", "NaN", "Infinity", "1e400000000"])
async def test_record_usage_with_bad_quantity_is_invalid(costs_stub, profile, quantity):
    request = costs_pb2.RecordUsageRequest(
        request_id="r", provider="acme", model="m", unit="seconds", quantity=quantity
    )
    details = await expect_status(
        costs_stub.RecordUsage(request, metadata=profile), Code.INVALID_ARGUMENT
    )
    assert "quantity" in details


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({"seconds": float("nan")}, "NaN"),
        ({"seconds": float("inf")}, "infinite"),
        ({"note": "a\x00b"}, "NUL"),
        ({"note": "x" * 20_000}, "larger than"),
    ],
)
async def test_record_usage_with_attributes_jsonb_cannot_hold_is_invalid_and_not_stored(
    costs_stub, profile, attributes, expected
):
    request = costs_pb2.RecordUsageRequest(
        request_id="r", provider="acme", model="m", unit="seconds", quantity="3"
    )
    request.attributes.update(attributes)
    details = await expect_status(
        costs_stub.RecordUsage(request, metadata=profile), Code.INVALID_ARGUMENT
    )
    assert "attributes" in details
    assert expected in details
    listed = await costs_stub.ListCostEntries(costs_pb2.ListCostEntriesRequest(), metadata=profile)
    assert not listed.entries


def test_catalog_line_whose_per_is_not_a_power_of_ten_is_refused_by_line(tmp_path):
    catalog = tmp_path / "prices.csv"
    catalog.write_text(
        "# a comment\n"
        "provider,model,usage_type,unit,per,unit_price_usd,prompt_tokens_over,effective_from,"
        "source,checked_on\n"
        "acme,m,seconds,second,1000,0.5,0,2025-01-01,test,2025-01-01\n"
        "acme,m,requests,request,3,0.5,0,2025-01-01,test,2025-01-01\n"
    )
    with pytest.raises(ValueError, match="data line 2: per must be a power of ten"):
        read_catalog(catalog)


def test_the_catalog_in_the_repository_reads():
    prices = read_catalog(PRICE_CATALOG)
    assert {p.provider for p in prices} == {"elevenlabs", "gemini", "piper"}


async def catalog_version(database_url: str) -> int:
    connection = await asyncpg.connect(database_url)
    try:
        return await connection.fetchval("SELECT version FROM costs.catalog_version")
    finally:
        await connection.close()


async def test_a_price_changed_in_sql_prices_the_next_line_though_the_catalog_was_held(
    costs_stub, profile, database_url
):
    """Each process prices with the catalog it holds and records only if that catalog is
    still current: a change made by hand is used by the very next line."""
    provider = f"repriced-{uuid.uuid4().hex[:8]}"
    connection = await asyncpg.connect(database_url)
    try:
        await add_prices(
            connection, provider, ("m", "seconds", "second", Decimal("0.010"), date(2025, 1, 1))
        )

        async def record() -> costs_pb2.CostEntry:
            request = costs_pb2.RecordUsageRequest(
                request_id=request_id(),
                provider=provider,
                model="m",
                unit="seconds",
                quantity="10",
                occurred_at=timestamp(datetime(2025, 6, 1, tzinfo=UTC)),
            )
            return (await costs_stub.RecordUsage(request, metadata=profile)).entry

        assert Decimal((await record()).cost_usd) == Decimal("0.1")  # the catalog now held
        before = await catalog_version(database_url)
        await connection.execute(
            "UPDATE costs.prices SET unit_price_usd = 0.020 WHERE provider = $1", provider
        )
        assert await catalog_version(database_url) > before
        entry = await record()
    finally:
        await connection.close()
    assert Decimal(entry.cost_usd) == Decimal("0.2")
    assert Decimal(entry.applied_prices[0].unit_price_usd) == Decimal("0.02")


async def test_loading_an_unchanged_catalog_file_moves_no_version(costs_service, database_url):
    """A replica's start-up load rewrites no row that did not change, so the other replicas
    keep the catalog they hold."""
    connection = await asyncpg.connect(database_url)
    try:
        await load_price_catalog(connection)
        before = await catalog_version(database_url)
        await load_price_catalog(connection)
    finally:
        await connection.close()
    assert await catalog_version(database_url) == before


def test_a_catalog_row_for_every_model_must_cost_nothing(tmp_path):
    catalog = tmp_path / "prices.csv"
    catalog.write_text(
        "provider,model,usage_type,unit,per,unit_price_usd,prompt_tokens_over,effective_from,"
        "source,checked_on\n"
        "free,*,*,any,1,0,0,2025-01-01,test,2025-01-01\n"
        "acme,*,seconds,second,1,0.5,0,2025-01-01,test,2025-01-01\n"
    )
    with pytest.raises(ValueError, match="data line 2: a row for every model"):
        read_catalog(catalog)


async def record_usage(costs_stub, profile, provider: str, model: str, unit: str):
    request = costs_pb2.RecordUsageRequest(
        request_id=request_id(),
        provider=provider,
        model=model,
        unit=unit,
        quantity="1200",
        occurred_at=timestamp(datetime(2025, 6, 1, tzinfo=UTC)),
    )
    return (await costs_stub.RecordUsage(request, metadata=profile)).entry


async def test_a_free_providers_lines_are_priced_at_zero_not_unpriced(costs_stub, profile):
    entry = await record_usage(costs_stub, profile, "piper", "en_US-lessac-medium", "characters")
    assert entry.priced
    assert Decimal(entry.cost_usd) == 0
    assert [(a.usage_type, Decimal(a.unit_price_usd)) for a in entry.applied_prices] == [
        ("characters", 0)
    ]
    unknown = await record_usage(costs_stub, profile, "unknown-engine", "m", "characters")
    assert not unknown.priced


async def test_a_models_own_price_wins_over_its_providers_free_row(
    costs_stub, profile, database_url
):
    provider = f"mixed-{uuid.uuid4().hex[:8]}"
    connection = await asyncpg.connect(database_url)
    try:
        await add_prices(
            connection,
            provider,
            ("paid", "seconds", "second", Decimal("0.01"), date(2025, 1, 1)),
            ("*", "*", "any", Decimal(0), date(2025, 1, 1)),
        )
        with pytest.raises(asyncpg.CheckViolationError):
            await add_prices(
                connection, provider, ("*", "seconds", "s", Decimal("0.5"), date(2025, 1, 1))
            )
    finally:
        await connection.close()
    paid = await record_usage(costs_stub, profile, provider, "paid", "seconds")
    assert Decimal(paid.cost_usd) == Decimal("12")
    free = await record_usage(costs_stub, profile, provider, "paid", "characters")
    assert (free.priced, Decimal(free.cost_usd)) == (True, 0)
