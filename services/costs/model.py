"""Usage lines, prices, summaries and budgets, independent of gRPC and SQL.

All money is Decimal and every computation runs in a context that raises instead of rounding,
so a cost is either exact or an error, never a silently rounded number.
"""

import csv
import decimal
import enum
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

from services.runtime.errors import InvalidArgument

EXACT = decimal.Context(
    prec=100, traps=[decimal.Inexact, decimal.Overflow, decimal.InvalidOperation]
)
# The most a decimal on the wire (a quantity, a budget's limit, an estimate) may hold: 15
# digits before the point (below a quadrillion) and 18 after (an atto-dollar). numeric keeps
# any such value exactly, and every sum and product of them fits EXACT's 100 digits.
MAX_INTEGER_DIGITS = 15
MAX_FRACTION_DIGITS = 18
ELEVENLABS = "elevenlabs"
GEMINI = "gemini"
TEXT_PREVIEW_LENGTH = 100
DEFAULT_ALERT_THRESHOLDS = (50, 80, 100)


def exact_sum(values: Iterable[Decimal]) -> Decimal:
    total = Decimal(0)
    for value in values:
        total = EXACT.add(total, value)
    return total


@dataclass(frozen=True, slots=True)
class Price:
    """One catalog row: what `per` units of a usage type cost from effective_from on."""

    provider: str
    model: str
    usage_type: str
    unit: str
    per: Decimal
    unit_price_usd: Decimal
    prompt_tokens_over: int
    effective_from: date
    source: str
    checked_on: date


# A catalog row's model or usage type that stands for every one: only in rows that cost
# nothing, for providers that charge nothing (a TTS engine run locally), so that their lines
# are priced at zero rather than left unpriced.
ANY = "*"


@dataclass(frozen=True, slots=True)
class Catalog:
    """The price catalog at one version (costs.catalog_version), its rows by provider and
    model: pricing a line looks only at its own model's rows and its provider's free rows."""

    version: int
    by_model: dict[tuple[str, str], tuple[Price, ...]]

    @classmethod
    def of(cls, version: int, prices: Iterable[Price]) -> "Catalog":
        by_model: dict[tuple[str, str], list[Price]] = {}
        for price in prices:
            by_model.setdefault((price.provider, price.model), []).append(price)
        return cls(version, {key: tuple(rows) for key, rows in by_model.items()})

    def for_line(self, line: "UsageLine") -> tuple[Price, ...]:
        return self.by_model.get((line.provider, line.model), ()) + self.by_model.get(
            (line.provider, ANY), ()
        )


# What each call makes several of (a price applied per usage type, the pricing, the entry, a
# budget's status) are named tuples: immutable as a frozen dataclass is, and made in a
# fraction of its CPU (a frozen dataclass sets each field through object.__setattr__).


class AppliedPrice(NamedTuple):
    usage_type: str
    quantity: Decimal
    unit_price_usd: Decimal
    per: Decimal
    cost_usd: Decimal
    effective_from: date

    def as_json(self) -> dict[str, str]:
        return {
            "usage_type": self.usage_type,
            "quantity": str(self.quantity),
            "unit_price_usd": str(self.unit_price_usd),
            "per": str(self.per),
            "cost_usd": str(self.cost_usd),
            "effective_from": self.effective_from.isoformat(),
        }

    @classmethod
    def from_json(cls, value: dict[str, str]) -> "AppliedPrice":
        return cls(
            usage_type=value["usage_type"],
            quantity=Decimal(value["quantity"]),
            unit_price_usd=Decimal(value["unit_price_usd"]),
            per=Decimal(value["per"]),
            cost_usd=Decimal(value["cost_usd"]),
            effective_from=date.fromisoformat(value["effective_from"]),
        )


class Pricing(NamedTuple):
    cost_usd: Decimal
    priced: bool
    applied_prices: tuple[AppliedPrice, ...]


@dataclass(frozen=True, slots=True)
class UsageLine:
    """A validated record request: the raw usage and the quantities it is billed by."""

    request_id: str
    provider: str
    model: str
    job_id: uuid.UUID | None
    occurred_at: datetime
    usage: dict[str, Decimal]
    billed: dict[str, Decimal]
    attributes: dict[str, Any] = field(default_factory=dict)
    # The prompt size that selects a tiered price (Gemini 2.5 Pro above 200K tokens).
    prompt_tokens: int = 0

    def as_json(self) -> dict[str, Any]:
        """A JSON form for the spool; from_json gives the same line back."""
        return {
            "request_id": self.request_id,
            "provider": self.provider,
            "model": self.model,
            "job_id": self.job_id and str(self.job_id),
            "occurred_at": self.occurred_at.isoformat(),
            "usage": {name: str(value) for name, value in self.usage.items()},
            "billed": {name: str(value) for name, value in self.billed.items()},
            "attributes": self.attributes,
            "prompt_tokens": self.prompt_tokens,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "UsageLine":
        return cls(
            request_id=value["request_id"],
            provider=value["provider"],
            model=value["model"],
            job_id=value["job_id"] and uuid.UUID(value["job_id"]),
            occurred_at=datetime.fromisoformat(value["occurred_at"]),
            usage={name: Decimal(v) for name, v in value["usage"].items()},
            billed={name: Decimal(v) for name, v in value["billed"].items()},
            attributes=value["attributes"],
            prompt_tokens=value["prompt_tokens"],
        )


class CostEntry(NamedTuple):
    entry_id: uuid.UUID
    request_id: str
    provider: str
    model: str
    job_id: uuid.UUID | None
    occurred_at: datetime
    recorded_at: datetime
    usage: dict[str, str]
    cost_usd: Decimal
    priced: bool
    applied_prices: tuple[AppliedPrice, ...]
    attributes: dict[str, Any]


def elevenlabs_tts_line(
    *,
    request_id: str,
    job_id: uuid.UUID | None,
    model_id: str,
    voice_id: str,
    characters: int,
    credits_charged: int | None,
    text_preview: str,
    occurred_at: datetime,
) -> UsageLine:
    """Billed by characters; ElevenLabs' own credit count is kept beside them."""
    usage = {"characters": Decimal(characters)}
    attributes: dict[str, Any] = {
        "voice_id": voice_id,
        "text_preview": text_preview[:TEXT_PREVIEW_LENGTH],
    }
    if credits_charged is not None:
        usage["credits_charged"] = Decimal(credits_charged)
    return UsageLine(
        request_id=request_id,
        provider=ELEVENLABS,
        model=model_id,
        job_id=job_id,
        occurred_at=occurred_at,
        usage=usage,
        billed={"characters": Decimal(characters)},
        attributes=attributes,
    )


def gemini_line(
    *,
    request_id: str,
    job_id: uuid.UUID | None,
    model: str,
    prompt_tokens: int,
    output_tokens: int,
    thinking_tokens: int,
    cached_tokens: int,
    audio_input_tokens: int,
    frames_analyzed: int,
    occurred_at: datetime,
) -> UsageLine:
    """Splits the prompt into text, cached and audio tokens; thinking is billed as output."""
    if cached_tokens + audio_input_tokens > prompt_tokens:
        raise InvalidArgument(
            "cached_tokens + audio_input_tokens must not exceed prompt_tokens "
            f"({cached_tokens} + {audio_input_tokens} > {prompt_tokens}); prompt_tokens counts "
            "every prompt token, as Gemini's prompt_token_count does"
        )
    usage = {
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "thinking_tokens": thinking_tokens,
        "cached_tokens": cached_tokens,
        "audio_input_tokens": audio_input_tokens,
    }
    billed = {
        "input_tokens": prompt_tokens - cached_tokens - audio_input_tokens,
        "cached_tokens": cached_tokens,
        "audio_input_tokens": audio_input_tokens,
        "output_tokens": output_tokens + thinking_tokens,
    }
    return UsageLine(
        request_id=request_id,
        provider=GEMINI,
        model=model,
        job_id=job_id,
        occurred_at=occurred_at,
        usage={name: Decimal(value) for name, value in usage.items()},
        billed={name: Decimal(value) for name, value in billed.items()},
        attributes={"frames_analyzed": frames_analyzed} if frames_analyzed else {},
        prompt_tokens=prompt_tokens,
    )


def price_line(line: UsageLine, catalog: Iterable[Price]) -> Pricing:
    """The cost of a line with the prices in effect at its occurred_at.

    A line is priced only when every usage type it bills for has a price; otherwise it is
    kept at cost 0 and flagged, never dropped and never half-priced. A row for the line's own
    model and usage type wins over a free row for any (ANY).
    """
    day = line.occurred_at.astimezone(UTC).date()
    prices = [
        price
        for price in catalog
        if price.provider == line.provider
        and price.model in (line.model, ANY)
        and price.effective_from <= day
        and (price.prompt_tokens_over == 0 or line.prompt_tokens > price.prompt_tokens_over)
    ]
    applied = []
    for usage_type, quantity in sorted(line.billed.items()):
        if quantity == 0:
            continue
        candidates = [price for price in prices if price.usage_type in (usage_type, ANY)]
        if not candidates:
            return Pricing(Decimal(0), False, ())
        price = max(
            candidates,
            key=lambda p: (
                p.model != ANY,
                p.usage_type != ANY,
                p.prompt_tokens_over,
                p.effective_from,
            ),
        )
        cost = EXACT.divide(EXACT.multiply(quantity, price.unit_price_usd), price.per)
        applied.append(
            AppliedPrice(
                usage_type, quantity, price.unit_price_usd, price.per, cost, price.effective_from
            )
        )
    return Pricing(exact_sum(a.cost_usd for a in applied), True, tuple(applied))


def read_catalog(path: Path) -> list[Price]:
    """The catalog file's rows; ValueError names the line and what is wrong with it."""
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    prices = []
    for number, row in enumerate(csv.DictReader(lines), start=2):
        try:
            per = Decimal(row["per"])
            if per <= 0 or per.as_tuple().digits[0] != 1 or set(per.as_tuple().digits[1:]) - {0}:
                raise ValueError(f"per must be a power of ten, got {row['per']}")
            if ANY in (row["model"], row["usage_type"]) and Decimal(row["unit_price_usd"]):
                raise ValueError(
                    f"a row for every model or usage type ({ANY!r}) must cost 0: it is for "
                    "providers that charge nothing"
                )
            prices.append(
                Price(
                    provider=row["provider"],
                    model=row["model"],
                    usage_type=row["usage_type"],
                    unit=row["unit"],
                    per=per,
                    unit_price_usd=Decimal(row["unit_price_usd"]),
                    prompt_tokens_over=int(row["prompt_tokens_over"]),
                    effective_from=date.fromisoformat(row["effective_from"]),
                    source=row["source"],
                    checked_on=date.fromisoformat(row["checked_on"]),
                )
            )
        except (KeyError, ValueError, TypeError, decimal.InvalidOperation) as error:
            raise ValueError(f"{path} data line {number - 1}: {error}") from error
    return prices


class GroupBy(enum.StrEnum):
    PROVIDER = "PROVIDER"
    MODEL = "MODEL"
    DAY = "DAY"
    MONTH = "MONTH"
    JOB = "JOB"
    PROFILE = "PROFILE"
    VOICE = "VOICE"


@dataclass(frozen=True, slots=True)
class SummaryRow:
    priced: bool
    cost_usd: Decimal
    line_count: int
    provider: str = ""
    model: str = ""
    day: date | None = None
    month: str = ""
    job_id: uuid.UUID | None = None
    profile_id: str = ""
    voice_id: str = ""


@dataclass(frozen=True, slots=True)
class CostSummary:
    rows: tuple[SummaryRow, ...]

    @property
    def total_cost_usd(self) -> Decimal:
        return exact_sum(row.cost_usd for row in self.rows if row.priced)

    @property
    def unpriced_line_count(self) -> int:
        return sum(row.line_count for row in self.rows if not row.priced)


@dataclass(frozen=True, slots=True)
class TimeRange:
    """[start, end), split into whole UTC days (read from the rollup) and the ragged edges."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise InvalidArgument("end_time must be after start_time")

    @property
    def whole_days(self) -> tuple[date, date]:
        """[first, last) whole days inside the range; empty when first >= last."""
        first = self.start.astimezone(UTC).date()
        last = self.end.astimezone(UTC).date()
        if datetime.combine(first, time(), UTC) < self.start:
            if first == date.max:  # the range lies within the last day a Timestamp holds
                return last, last
            first += timedelta(days=1)
        return first, last

    @property
    def edges(self) -> tuple[tuple[datetime, datetime], tuple[datetime, datetime]]:
        """The parts of the range outside the whole days (each possibly empty)."""
        first, last = self.whole_days
        if first >= last:
            return (self.start, self.end), (self.end, self.end)
        return (
            (self.start, datetime.combine(first, time(), UTC)),
            (datetime.combine(last, time(), UTC), self.end),
        )


@dataclass(frozen=True, slots=True)
class EntryFilter:
    """ListCostEntries filters; empty means no restriction."""

    job_id: uuid.UUID | None = None
    provider: str = ""
    model: str = ""
    start: datetime | None = None
    end: datetime | None = None
    unpriced_only: bool = False

    def as_key(self) -> list[Any]:
        return [
            self.job_id and str(self.job_id),
            self.provider,
            self.model,
            self.start and self.start.isoformat(),
            self.end and self.end.isoformat(),
            self.unpriced_only,
        ]


class BudgetPeriod(enum.StrEnum):
    MONTHLY = "MONTHLY"
    DAILY = "DAILY"

    def bounds(self, now: datetime) -> tuple[datetime, datetime]:
        """The current period [start, end) in UTC."""
        today = now.astimezone(UTC).date()
        if self == BudgetPeriod.DAILY:
            start, end = today, today + timedelta(days=1)
        else:
            start = today.replace(day=1)
            end = (start + timedelta(days=32)).replace(day=1)
        return datetime.combine(start, time(), UTC), datetime.combine(end, time(), UTC)


class BudgetState(enum.StrEnum):
    OK = "OK"
    WARNING = "WARNING"
    EXCEEDED = "EXCEEDED"


@dataclass(frozen=True, slots=True)
class Budget:
    period: BudgetPeriod
    limit_usd: Decimal
    alert_thresholds: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.limit_usd <= 0:
            raise InvalidArgument(f"limit_usd must be more than 0, got {self.limit_usd}")
        for threshold in self.alert_thresholds:
            if not 1 <= threshold <= 1000:
                raise InvalidArgument(
                    f"alert_thresholds are percentages from 1 to 1000, got {threshold}"
                )

    def crossed_thresholds(self, spent: Decimal) -> list[int]:
        spent_percent = EXACT.multiply(spent, 100)
        return [
            t for t in self.alert_thresholds if spent_percent >= EXACT.multiply(self.limit_usd, t)
        ]


class BudgetStatus(NamedTuple):
    budget: Budget
    spent_usd: Decimal
    period_start: datetime
    resets_at: datetime

    @property
    def remaining_usd(self) -> Decimal:
        return max(EXACT.subtract(self.budget.limit_usd, self.spent_usd), Decimal(0))

    @property
    def state(self) -> BudgetState:
        if self.spent_usd >= self.budget.limit_usd:
            return BudgetState.EXCEEDED
        if self.budget.crossed_thresholds(self.spent_usd):
            return BudgetState.WARNING
        return BudgetState.OK

    def allows(self, estimated_cost_usd: Decimal) -> bool:
        return EXACT.add(self.spent_usd, estimated_cost_usd) <= self.budget.limit_usd
