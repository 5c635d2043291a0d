"""costs.v1.CostService: validates requests and converts between messages and the model."""

import decimal
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from costs.v1 import costs_pb2, costs_pb2_grpc
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from grpc.aio import ServicerContext

from services.costs.leases import LeaseCheck
from services.costs.model import (
    DEFAULT_ALERT_THRESHOLDS,
    EXACT,
    MAX_FRACTION_DIGITS,
    MAX_INTEGER_DIGITS,
    TEXT_PREVIEW_LENGTH,
    AppliedPrice,
    Budget,
    BudgetPeriod,
    BudgetStatus,
    CostEntry,
    EntryFilter,
    GroupBy,
    Price,
    SummaryRow,
    TimeRange,
    UsageLine,
    elevenlabs_tts_line,
    gemini_line,
)
from services.costs.recorder import Recorder
from services.costs.store import CostStore
from services.runtime.call_context import current_caller, require_profile_id
from services.runtime.errors import InvalidArgument, PermissionDenied
from services.runtime.fields import (
    at_most,
    optional_datetime,
    struct_dict,
    struct_message,
    text,
    timestamp_message,
    without_controls,
)
from services.runtime.lifecycle import EXPORT_PAGE_ROWS, log_deleted
from services.runtime.page_tokens import decode_page_token, page_size
from services.runtime.paging import encoded_page

MAX_NAME_LENGTH = 128
MAX_REQUEST_ID_LENGTH = 128
MAX_ATTRIBUTES_BYTES = 16_384
# Attributes are a few labels (a voice, a preview, a frame count), not a document.
MAX_ATTRIBUTES_VALUES = 1_000
# A budget warns at a few percentages (50, 80, 100 by default).
MAX_ALERT_THRESHOLDS = 10
# Lines in one StreamUsage message (one batch); a stream may send any number of messages.
MAX_LINES_PER_MESSAGE = 500
# The longest decimal string read: 15 + 18 digits, a point, and room for zeros and a sign.
MAX_DECIMAL_TEXT_LENGTH = 64
# Plain or exponent notation in ASCII digits, as str(Decimal) writes it ("0.5", "1E-7"); not
# NaN, infinity, underscores or other scripts' digits, which Decimal() would also read.
_DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# Callers' clocks run a little ahead of ours; more than this is a caller's bug.
CLOCK_SKEW = timedelta(seconds=5)
# Lines of a StreamUsage call recorded per statement.
STREAM_BATCH_SIZE = 500


def decimal_text(value: Decimal) -> str:
    """The exact value in plain notation without trailing zeros: "0.0003", "12.5", "100".
    normalize() in EXACT: under the default context it rounds to 28 digits."""
    return format(value.normalize(EXACT), "f")


def _text(value: str, field: str, *, required: bool = False, limit: int = MAX_NAME_LENGTH) -> str:
    return text(value.strip(), field, limit=limit, required=required)


def _request_id(value: str) -> str:
    return _text(
        value,
        "request_id (the provider's request id, or any id unique to this call)",
        required=True,
        limit=MAX_REQUEST_ID_LENGTH,
    )


def _job_id(value: str, field: str = "job_id") -> uuid.UUID | None:
    if not value:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(f"{field} must be a Jobs job UUID, got {value[:64]!r}") from None


def _count(value: int, field: str) -> int:
    if value < 0:
        raise InvalidArgument(f"{field} must not be negative, got {value}")
    return value


def _decimal(value: str, field: str, *, positive: bool = False) -> Decimal:
    """The exact decimal a string spells, never through a float or a rounding context;
    InvalidArgument beyond MAX_INTEGER_DIGITS before the point or MAX_FRACTION_DIGITS after
    it (trailing zeros aside), so whatever is accepted is stored and answered unchanged."""
    number_text = value.strip()
    try:
        if len(number_text) > MAX_DECIMAL_TEXT_LENGTH or not _DECIMAL_TEXT.fullmatch(number_text):
            raise decimal.InvalidOperation
        number = Decimal(number_text)  # exact: a constructor does not round
    except decimal.InvalidOperation:  # also an exponent beyond what Decimal can hold
        raise InvalidArgument(
            f'{field} must be a decimal number such as "12.50", got {value[:64]!r}'
        ) from None
    if number < 0 or (positive and number == 0):
        kind = "more than 0" if positive else "0 or more"
        raise InvalidArgument(f"{field} must be a number {kind}, got {value[:64]!r}")
    if not number:
        return Decimal(0)  # not 0E+999999999, whose exponent no arithmetic needs
    # adjusted() is the place of the first digit: checked first, so that normalize() below
    # works on at most MAX_DECIMAL_TEXT_LENGTH digits within EXACT's exponent range.
    if not (
        -MAX_FRACTION_DIGITS <= number.adjusted() < MAX_INTEGER_DIGITS
        and -int(number.normalize(EXACT).as_tuple().exponent) <= MAX_FRACTION_DIGITS
    ):
        raise InvalidArgument(
            f"{field} may have at most {MAX_INTEGER_DIGITS} digits before the decimal point and "
            f"{MAX_FRACTION_DIGITS} after it, got {value[:64]!r}"
        )
    return number


def _occurred_at(request: Message) -> datetime:
    now = datetime.now(UTC)
    value = optional_datetime(request, "occurred_at")
    if value is None:
        return now
    if value > now + CLOCK_SKEW:
        raise InvalidArgument(
            f"occurred_at {value.isoformat()} is in the future; send when the call happened, "
            "or leave it unset for now"
        )
    return value


def _attributes(message: struct_pb2.Struct) -> dict:
    return struct_dict(
        message, "attributes", max_values=MAX_ATTRIBUTES_VALUES, max_bytes=MAX_ATTRIBUTES_BYTES
    )


def elevenlabs_line(request: costs_pb2.RecordElevenLabsTTSRequest) -> UsageLine:
    return elevenlabs_tts_line(
        request_id=_request_id(request.request_id),
        job_id=_job_id(request.job_id),
        model_id=_text(
            request.model_id, 'model_id (for example "eleven_flash_v2_5")', required=True
        ),
        voice_id=_text(request.voice_id, "voice_id"),
        characters=_count(request.characters, "characters"),
        credits_charged=(
            _count(request.credits_charged, "credits_charged")
            if request.HasField("credits_charged")
            else None
        ),
        # A preview never refuses a record of money spent (a metering outbox would keep
        # resending it): cut to its length, its control characters made spaces.
        text_preview=without_controls(request.text_preview[:TEXT_PREVIEW_LENGTH]),
        occurred_at=_occurred_at(request),
    )


def gemini_usage_line(request: costs_pb2.RecordGeminiUsageRequest) -> UsageLine:
    return gemini_line(
        request_id=_request_id(request.request_id),
        job_id=_job_id(request.job_id),
        model=_text(request.model, 'model (for example "gemini-2.5-flash")', required=True),
        prompt_tokens=_count(request.prompt_tokens, "prompt_tokens"),
        output_tokens=_count(request.output_tokens, "output_tokens"),
        thinking_tokens=_count(request.thinking_tokens, "thinking_tokens"),
        cached_tokens=_count(request.cached_tokens, "cached_tokens"),
        audio_input_tokens=_count(request.audio_input_tokens, "audio_input_tokens"),
        frames_analyzed=_count(request.frames_analyzed, "frames_analyzed"),
        occurred_at=_occurred_at(request),
    )


def generic_line(request: costs_pb2.RecordUsageRequest) -> UsageLine:
    unit = _text(request.unit, 'unit (the usage type, for example "input_tokens")', required=True)
    quantity = _decimal(request.quantity, "quantity")
    return UsageLine(
        request_id=_request_id(request.request_id),
        provider=_text(request.provider, 'provider (for example "openai")', required=True).lower(),
        model=_text(request.model, "model", required=True),
        job_id=_job_id(request.job_id),
        occurred_at=_occurred_at(request),
        usage={unit: quantity},
        billed={unit: quantity},
        attributes=_attributes(request.attributes),
    )


def stream_line(line: costs_pb2.UsageLine) -> UsageLine:
    kind = line.WhichOneof("line")
    if kind == "elevenlabs_tts":
        return elevenlabs_line(line.elevenlabs_tts)
    if kind == "gemini":
        return gemini_usage_line(line.gemini)
    if kind == "usage":
        return generic_line(line.usage)
    raise InvalidArgument("each StreamUsage line must set one of elevenlabs_tts, gemini, usage")


def entry_message(entry: CostEntry) -> costs_pb2.CostEntry:
    return costs_pb2.CostEntry(
        entry_id=str(entry.entry_id),
        request_id=entry.request_id,
        provider=entry.provider,
        model=entry.model,
        job_id=str(entry.job_id) if entry.job_id else "",
        occurred_at=timestamp_message(entry.occurred_at),
        recorded_at=timestamp_message(entry.recorded_at),
        usage=entry.usage,
        cost_usd=decimal_text(entry.cost_usd),
        priced=entry.priced,
        applied_prices=[_applied_price_message(a) for a in entry.applied_prices],
        attributes=struct_message(entry.attributes),
    )


def _applied_price_message(applied: AppliedPrice) -> costs_pb2.AppliedPrice:
    return costs_pb2.AppliedPrice(
        usage_type=applied.usage_type,
        quantity=decimal_text(applied.quantity),
        unit_price_usd=decimal_text(applied.unit_price_usd),
        per=decimal_text(applied.per),
        cost_usd=decimal_text(applied.cost_usd),
        effective_from=applied.effective_from.isoformat(),
    )


def _price_message(price: Price) -> costs_pb2.Price:
    return costs_pb2.Price(
        provider=price.provider,
        model=price.model,
        usage_type=price.usage_type,
        unit=price.unit,
        unit_price_usd=decimal_text(price.unit_price_usd),
        per=decimal_text(price.per),
        prompt_tokens_over=price.prompt_tokens_over,
        effective_from=price.effective_from.isoformat(),
        source=price.source,
        checked_on=price.checked_on.isoformat(),
    )


def _row_message(row: SummaryRow) -> costs_pb2.CostSummaryRow:
    return costs_pb2.CostSummaryRow(
        provider=row.provider,
        model=row.model,
        day=row.day.isoformat() if row.day else "",
        month=row.month,
        job_id=str(row.job_id) if row.job_id else "",
        cost_usd=decimal_text(row.cost_usd),
        line_count=row.line_count,
        profile_id=row.profile_id,
        voice_id=row.voice_id,
    )


def _period(value: int) -> BudgetPeriod:
    if value == costs_pb2.BUDGET_PERIOD_UNSPECIFIED or value not in costs_pb2.BudgetPeriod.values():
        raise InvalidArgument(f"period must be one of {', '.join(BudgetPeriod)}")
    return BudgetPeriod(costs_pb2.BudgetPeriod.Name(value))


def _group_by(values: Sequence[int]) -> list[GroupBy]:
    groups = []
    for value in at_most(values, "group_by", len(GroupBy)):
        if value == costs_pb2.GROUP_BY_UNSPECIFIED or value not in costs_pb2.GroupBy.values():
            raise InvalidArgument(f"group_by entries must be among {', '.join(GroupBy)}")
        group = GroupBy(costs_pb2.GroupBy.Name(value))
        if group not in groups:
            groups.append(group)
    return groups


def budget_message(status: BudgetStatus) -> costs_pb2.BudgetStatus:
    return costs_pb2.BudgetStatus(
        period=costs_pb2.BudgetPeriod.Value(status.budget.period),
        limit_usd=decimal_text(status.budget.limit_usd),
        alert_thresholds=status.budget.alert_thresholds,
        spent_usd=decimal_text(status.spent_usd),
        remaining_usd=decimal_text(status.remaining_usd),
        state=costs_pb2.BudgetState.Value(status.state),
        period_start=timestamp_message(status.period_start),
        resets_at=timestamp_message(status.resets_at),
    )


class CostServicer(costs_pb2_grpc.CostServiceServicer):
    def __init__(
        self,
        store: CostStore,
        recorder: Recorder,
        reply_bytes: int,
        leases: LeaseCheck | None = None,
    ) -> None:
        """`reply_bytes`: the most a list reply's rows may take (paging.reply_budget);
        `leases`: how a worker's lease on a job is checked (no worker may record without)."""
        self._store = store
        self._recorder = recorder
        self._reply_bytes = reply_bytes
        self._leases = leases

    async def _record(self, line: UsageLine, lease_id: str) -> costs_pb2.RecordResponse:
        caller = current_caller()
        if caller is not None and caller.worker:
            if self._leases is None:
                raise PermissionDenied("this Costs service takes no usage from workers")
            await self._leases.require(require_profile_id(), line.job_id, lease_id)
        entry = await self._recorder.record(line)
        if entry is None:
            return costs_pb2.RecordResponse(spooled=True)
        return costs_pb2.RecordResponse(entry=entry_message(entry))

    async def RecordElevenLabsTTS(
        self, request: costs_pb2.RecordElevenLabsTTSRequest, context: ServicerContext
    ) -> costs_pb2.RecordResponse:
        return await self._record(elevenlabs_line(request), request.lease_id)

    async def RecordGeminiUsage(
        self, request: costs_pb2.RecordGeminiUsageRequest, context: ServicerContext
    ) -> costs_pb2.RecordResponse:
        return await self._record(gemini_usage_line(request), request.lease_id)

    async def RecordUsage(
        self, request: costs_pb2.RecordUsageRequest, context: ServicerContext
    ) -> costs_pb2.RecordResponse:
        return await self._record(generic_line(request), request.lease_id)

    async def StreamUsage(
        self,
        request_iterator: AsyncIterator[costs_pb2.StreamUsageRequest],
        context: ServicerContext,
    ) -> costs_pb2.StreamUsageResponse:
        """Records in batches as lines arrive; a bad line ends the call after every line
        before it is recorded, so the caller can fix it and resend the whole stream (lines
        already recorded then count as duplicates)."""
        response = costs_pb2.StreamUsageResponse()

        async def record(batch: list[UsageLine]) -> None:
            accepted, spooled = await self._recorder.record_many(batch)
            response.accepted += accepted
            response.spooled += spooled
            response.duplicates += len(batch) - accepted

        batch: list[UsageLine] = []
        number = 0

        async def refusal(where: str, error: InvalidArgument) -> InvalidArgument:
            if batch:
                await record(batch)
            return InvalidArgument(f"{where}{error}; the {number} line(s) before it are recorded")

        async for request in request_iterator:
            try:
                lines = at_most(request.lines, "lines", MAX_LINES_PER_MESSAGE)
            except InvalidArgument as error:
                raise await refusal(f"the message after line {number}: ", error) from None
            for line in lines:
                try:
                    batch.append(stream_line(line))
                except InvalidArgument as error:
                    raise await refusal(f"line {number + 1}: ", error) from None
                number += 1
                if len(batch) == STREAM_BATCH_SIZE:
                    await record(batch)
                    batch = []
        if batch:
            await record(batch)
        return response

    async def ListPrices(
        self, request: costs_pb2.ListPricesRequest, context: ServicerContext
    ) -> costs_pb2.ListPricesResponse:
        provider = _text(request.provider, "provider").lower()
        prices = await self._store.list_prices(require_profile_id(), provider)
        return costs_pb2.ListPricesResponse(prices=[_price_message(p) for p in prices])

    async def GetCostSummary(
        self, request: costs_pb2.GetCostSummaryRequest, context: ServicerContext
    ) -> costs_pb2.CostSummary:
        return await self._summary(request, all_profiles=False)

    async def GetAllProfilesCostSummary(
        self, request: costs_pb2.GetCostSummaryRequest, context: ServicerContext
    ) -> costs_pb2.CostSummary:
        return await self._summary(request, all_profiles=True)

    async def _summary(
        self, request: costs_pb2.GetCostSummaryRequest, *, all_profiles: bool
    ) -> costs_pb2.CostSummary:
        start = optional_datetime(request, "start_time")
        end = optional_datetime(request, "end_time")
        if start is None or end is None:
            raise InvalidArgument("start_time and end_time are required")
        summary = await self._store.summary(
            None if all_profiles else require_profile_id(),
            TimeRange(start, end),
            _job_id(request.job_id),
            _group_by(request.group_by),
        )
        return costs_pb2.CostSummary(
            total_cost_usd=decimal_text(summary.total_cost_usd),
            rows=[_row_message(row) for row in summary.rows if row.priced],
            unpriced_rows=[_row_message(row) for row in summary.rows if not row.priced],
            unpriced_line_count=summary.unpriced_line_count,
        )

    async def ListCostEntries(
        self, request: costs_pb2.ListCostEntriesRequest, context: ServicerContext
    ) -> bytes:  # a ListCostEntriesResponse, encoded (paging.encoded_page)
        size = page_size(request.page_size)
        entry_filter = EntryFilter(
            job_id=_job_id(request.job_id),
            provider=_text(request.provider, "provider").lower(),
            model=_text(request.model, "model"),
            start=optional_datetime(request, "start_time"),
            end=optional_datetime(request, "end_time"),
            unpriced_only=request.unpriced_only,
        )
        after = None
        if request.page_token:
            after = decode_page_token(request.page_token, entry_filter.as_key())
        entries = await self._store.list_entries(
            require_profile_id(), entry_filter, size + 1, after
        )
        response = costs_pb2.ListCostEntriesResponse()
        return await encoded_page(
            response,
            "entries",
            entries[:size],
            more=len(entries) > size,
            to_message=entry_message,
            position=lambda entry: (entry.occurred_at, entry.entry_id),
            filters=entry_filter.as_key(),
            max_bytes=self._reply_bytes,
        )

    async def SetBudget(
        self, request: costs_pb2.SetBudgetRequest, context: ServicerContext
    ) -> costs_pb2.BudgetStatus:
        budget = Budget(
            period=_period(request.period),
            limit_usd=_decimal(request.limit_usd, "limit_usd", positive=True),
            alert_thresholds=tuple(
                sorted(
                    set(at_most(request.alert_thresholds, "alert_thresholds", MAX_ALERT_THRESHOLDS))
                )
            )
            or DEFAULT_ALERT_THRESHOLDS,
        )
        return budget_message(await self._store.set_budget(require_profile_id(), budget))

    async def GetBudget(
        self, request: costs_pb2.GetBudgetRequest, context: ServicerContext
    ) -> costs_pb2.BudgetStatus:
        period = _period(request.period)
        return budget_message(await self._store.get_budget(require_profile_id(), period))

    async def CheckBudget(
        self, request: costs_pb2.CheckBudgetRequest, context: ServicerContext
    ) -> costs_pb2.CheckBudgetResponse:
        estimate = _decimal(request.estimated_cost_usd, "estimated_cost_usd")
        statuses = await self._store.budget_statuses(require_profile_id())
        refusing = [s for s in statuses if not s.allows(estimate)]
        reason = "; ".join(
            f"{s.budget.period} budget: spent {s.spent_usd} + estimated {estimate} "
            f"> limit {s.budget.limit_usd} USD until {s.resets_at.isoformat()}"
            for s in refusing
        )
        return costs_pb2.CheckBudgetResponse(
            allowed=not refusing, budgets=[budget_message(s) for s in statuses], reason=reason
        )

    async def ExportProfile(
        self, request: costs_pb2.ExportProfileRequest, context: ServicerContext
    ) -> AsyncIterator[costs_pb2.ExportProfileResponse]:
        profile_id = require_profile_id()
        statuses = await self._store.budget_statuses(profile_id)
        budgets = [budget_message(status) for status in statuses]
        after = None
        while True:
            entries = await self._store.list_entries(
                profile_id, EntryFilter(), EXPORT_PAGE_ROWS + 1, after
            )
            page = entries[:EXPORT_PAGE_ROWS]
            yield costs_pb2.ExportProfileResponse(
                entries=[entry_message(entry) for entry in page], budgets=budgets
            )
            if len(entries) <= EXPORT_PAGE_ROWS:
                return
            budgets, after = [], (page[-1].occurred_at, page[-1].entry_id)

    async def DeleteProfile(
        self, request: costs_pb2.DeleteProfileRequest, context: ServicerContext
    ) -> costs_pb2.DeleteProfileResponse:
        profile_id = require_profile_id()
        budgets, entries = await self._store.count_for_deletion(profile_id)
        if not request.validate_only:
            budgets = await self._store.delete_budgets(profile_id)
            log_deleted(f"{budgets} budgets (its {entries} cost lines are kept)", True)
        return costs_pb2.DeleteProfileResponse(
            budgets=budgets, cost_entries_kept=entries, done=True
        )
