"""SQL for the costs schema. Every method runs in one tenant-scoped transaction."""

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, date, datetime
from typing import Any

import asyncpg
import orjson

from services.costs.model import (
    AppliedPrice,
    Budget,
    BudgetPeriod,
    BudgetStatus,
    Catalog,
    CostEntry,
    CostSummary,
    EntryFilter,
    GroupBy,
    Price,
    SummaryRow,
    TimeRange,
    UsageLine,
    price_line,
)
from services.runtime.database import TenantScopedPool
from services.runtime.errors import NotFound, Unavailable

log = logging.getLogger(__name__)

_ENTRY_COLUMNS = (
    "entry_id, request_id, provider, model, job_id, occurred_at, recorded_at, usage, cost_usd, "
    "priced, applied_prices, attributes"
)
_PRICE_COLUMNS = (
    "provider, model, usage_type, unit, per, unit_price_usd, prompt_tokens_over, effective_from, "
    "source, checked_on"
)
_PRICE_FIELDS = tuple(_PRICE_COLUMNS.split(", "))

# How each summary dimension is computed over the union of rollup rows and edge lines.
# Each is named after the SummaryRow field it fills.
_GROUP_COLUMNS = {
    GroupBy.PROVIDER: ("provider", "provider"),
    GroupBy.MODEL: ("model", "model"),
    GroupBy.DAY: ("day", "day"),
    GroupBy.MONTH: ("to_char(day, 'YYYY-MM')", "month"),
    GroupBy.JOB: ("job_id", "job_id"),
    GroupBy.PROFILE: ("profile_id", "profile_id"),
    GroupBy.VOICE: ("coalesce(voice_id, '')", "voice_id"),
}


def _entry(row: asyncpg.Record) -> CostEntry:
    return CostEntry(
        entry_id=row["entry_id"],
        request_id=row["request_id"],
        provider=row["provider"],
        model=row["model"],
        job_id=row["job_id"],
        occurred_at=row["occurred_at"],
        recorded_at=row["recorded_at"],
        usage=row["usage"],
        cost_usd=row["cost_usd"],
        priced=row["priced"],
        applied_prices=tuple(AppliedPrice.from_json(a) for a in row["applied_prices"]),
        attributes=row["attributes"],
    )


def _price(row: asyncpg.Record) -> Price:
    return Price(**dict(row))


async def load_catalog(connection: asyncpg.Connection, prices: Sequence[Price]) -> None:
    """Makes costs.prices hold every row of the catalog file.

    Rows are added or corrected, never removed: recorded lines name the versions they were
    priced with. Runs with the migrations, as the schema owner, outside any profile.
    """
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock(hashtext('costs:catalog'))")
        await connection.executemany(
            f"""
            INSERT INTO costs.prices ({_PRICE_COLUMNS})
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
            ON CONFLICT (provider, model, usage_type, prompt_tokens_over, effective_from)
            DO UPDATE SET unit = EXCLUDED.unit, per = EXCLUDED.per,
                unit_price_usd = EXCLUDED.unit_price_usd, source = EXCLUDED.source,
                checked_on = EXCLUDED.checked_on
            -- A row that did not change is not rewritten: it would move the catalog's version
            -- (migration 0007) and make every replica read the catalog again.
            WHERE (prices.unit, prices.per, prices.unit_price_usd, prices.source,
                prices.checked_on) IS DISTINCT FROM (EXCLUDED.unit, EXCLUDED.per,
                EXCLUDED.unit_price_usd, EXCLUDED.source, EXCLUDED.checked_on)
            """,
            [
                (
                    p.provider,
                    p.model,
                    p.usage_type,
                    p.unit,
                    p.per,
                    p.unit_price_usd,
                    p.prompt_tokens_over,
                    p.effective_from,
                    p.source,
                    p.checked_on,
                )
                for p in prices
            ],
        )


def entries_query(
    profile_id: str, entry_filter: EntryFilter, limit: int, after: tuple[datetime, uuid.UUID] | None
) -> tuple[str, list[Any]]:
    """The SELECT of CostStore.list_entries and its arguments. Each filter has an index that
    leads with profile_id and ends newest first (entries_of_job_, entries_by_provider_,
    entries_by_model_, entries_unpriced_newest_first), so a page is an index range scan with
    LIMIT however many other lines the profile has."""
    conditions = ["profile_id = $1"]
    arguments: list[Any] = [profile_id]

    def bind(value: Any) -> str:
        arguments.append(value)
        return f"${len(arguments)}"

    if entry_filter.job_id:
        conditions.append(f"job_id = {bind(entry_filter.job_id)}")
    if entry_filter.provider:
        conditions.append(f"provider = {bind(entry_filter.provider)}")
    if entry_filter.model:
        conditions.append(f"model = {bind(entry_filter.model)}")
    if entry_filter.start:
        conditions.append(f"occurred_at >= {bind(entry_filter.start)}")
    if entry_filter.end:
        conditions.append(f"occurred_at < {bind(entry_filter.end)}")
    if entry_filter.unpriced_only:
        conditions.append("NOT priced")
    if after:
        conditions.append(f"(occurred_at, entry_id) < ({bind(after[0])}, {bind(after[1])})")
    query = f"""
        SELECT {_ENTRY_COLUMNS} FROM costs.entries
        WHERE {" AND ".join(conditions)}
        ORDER BY occurred_at DESC, entry_id DESC
        LIMIT {bind(limit)}
    """
    return query, arguments


def _priced_batch(lines: Sequence[UsageLine], catalog: Catalog) -> str:
    """The lines priced, as the one JSON document costs.record_lines reads."""
    # The batch travels as one JSON document, serialized in one call by orjson: per line,
    # that costs less than three JSON columns and ten typed arrays encoded element by
    # element. Decimals go as their exact text (str); times as RFC 3339 and UUIDs in their
    # usual form, both of which Postgres reads.
    pricings = [price_line(line, catalog.for_line(line)) for line in lines]
    return orjson.dumps(
        [
            {
                "request_id": line.request_id,
                "provider": line.provider,
                "model": line.model,
                "job_id": line.job_id,
                "occurred_at": line.occurred_at,
                "usage": line.usage,
                "cost_usd": pricing.cost_usd,
                "priced": pricing.priced,
                "applied_prices": [applied.as_json() for applied in pricing.applied_prices],
                "attributes": line.attributes,
            }
            for line, pricing in zip(lines, pricings, strict=True)
        ],
        default=str,
    ).decode()


# SQLSTATE of costs.record_priced when the catalog changed since the version a batch was
# priced with (migration 0007).
CATALOG_CHANGED = "SU205"
# How many times a batch is priced again after the catalog changed under it, before the
# call is told to retry: the catalog changes a few times a year.
_REPRICINGS = 3


class CostStore:
    def __init__(self, pool: TenantScopedPool) -> None:
        self._pool = pool
        # The price catalog this process prices with, and its version; read at the first
        # record and again whenever the database says it changed.
        self._catalog: Catalog | None = None

    async def list_prices(self, profile_id: str, provider: str) -> list[Price]:
        async with self._pool.transaction(profile_id, readonly=True) as connection:
            rows = await connection.fetch(
                f"""
                SELECT {_PRICE_COLUMNS} FROM costs.prices
                WHERE $1 = '' OR provider = $1
                ORDER BY provider, model, usage_type, prompt_tokens_over, effective_from
                """,
                provider,
            )
        return [_price(row) for row in rows]

    async def record(self, profile_id: str, line: UsageLine) -> tuple[CostEntry, bool]:
        """Records a line; with a request_id already used by this profile, returns that line.

        The second value is False for such a duplicate. Concurrent duplicates wait on the
        unique constraint, so each request_id is counted once.
        """
        rows = await self._record(profile_id, [line], whole_rows=True)
        return _entry(rows[0]), rows[0]["new"]

    async def record_many(self, profile_id: str, lines: Sequence[UsageLine]) -> int:
        """Records a batch; returns how many were new (the rest duplicates)."""
        return len(await self._record(profile_id, lines, whole_rows=False))

    async def _record(
        self, profile_id: str, lines: Sequence[UsageLine], *, whole_rows: bool
    ) -> list[asyncpg.Record]:
        """The lines priced with the catalog this process holds and recorded in one statement,
        if the catalog is still at that version (costs.record_priced, migration 0007); else
        the catalog is read again and the lines priced again. The rows of the lines, the
        thresholds crossed logged. A batch's rows carry only request_ids."""
        for _ in range(_REPRICINGS):
            catalog = self._catalog or await self._read_catalog(profile_id)
            try:
                rows = await self._pool.call(
                    profile_id,
                    "SELECT * FROM costs.record_priced($1, $2, $3, $4, $5, $6, $7, $8)",
                    profile_id,
                    catalog.version,
                    _priced_batch(lines, catalog),
                    whole_rows,
                    *_period_days(_period_bounds(datetime.now(UTC))),
                )
                break
            except asyncpg.PostgresError as error:
                if error.sqlstate != CATALOG_CHANGED:
                    raise
                if self._catalog is catalog:  # not one a concurrent call read since
                    self._catalog = None
        else:
            raise Unavailable("the price catalog is being changed; retry shortly")
        crossings = sorted(
            (row for row in rows if row["crossed_period"] is not None),
            key=lambda row: (row["crossed_period"], row["threshold"]),
        )
        for crossing in crossings:
            log.warning(
                "%s budget crossed %d%%: spent %s of %s USD",
                crossing["crossed_period"],
                crossing["threshold"],
                crossing["spent_usd"],
                crossing["limit_usd"],
            )
        return [row for row in rows if row["crossed_period"] is None]

    async def _read_catalog(self, profile_id: str) -> Catalog:
        """The whole catalog and its version (costs.price_catalog), kept for what follows."""
        rows = await self._pool.call(
            profile_id, "SELECT * FROM costs.price_catalog($1)", profile_id
        )
        prices = (
            Price(**{name: row[name] for name in _PRICE_FIELDS})
            for row in rows
            if row["provider"] is not None
        )
        self._catalog = Catalog.of(rows[0]["version"], prices)
        return self._catalog

    async def list_entries(
        self,
        profile_id: str,
        entry_filter: EntryFilter,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None,
    ) -> list[CostEntry]:
        """Up to `limit` lines newest first, strictly after the (occurred_at, entry_id) given.

        Read whole: a line is small whatever its caller sends (attributes at most 16 KB, a
        few usage types), so even 500 of them are a few megabytes at most.
        """
        query, arguments = entries_query(profile_id, entry_filter, limit, after)
        async with self._pool.transaction(profile_id, readonly=True) as connection:
            rows = await connection.fetch(query, *arguments)
        return [_entry(row) for row in rows]

    async def summary(
        self,
        profile_id: str | None,
        time_range: TimeRange,
        job_id: uuid.UUID | None,
        group_by: Sequence[GroupBy],
    ) -> CostSummary:
        """Whole days come from the daily rollup, the ragged edges from the lines themselves,
        so the answer is exact for any range and fast for long ones. No profile: every
        profile's lines, for an operator's call only."""
        all_profiles = profile_id is None
        first_day, last_day = time_range.whole_days
        (edge1_start, edge1_end), (edge2_start, edge2_end) = time_range.edges
        job_condition = "AND job_id = $8" if job_id else "AND $8::uuid IS NULL"
        profile_condition = "$1::text IS NULL" if all_profiles else "profile_id = $1"
        fields = [_GROUP_COLUMNS[g][1] for g in group_by]
        select = ", ".join(
            ["priced", *(f"{_GROUP_COLUMNS[g][0]} AS {_GROUP_COLUMNS[g][1]}" for g in group_by)]
        )
        positions = ", ".join(str(n) for n in range(1, len(group_by) + 2))
        query = f"""
            WITH lines AS (
                SELECT profile_id, day, provider, model, job_id, voice_id, priced, cost_usd,
                       line_count
                FROM costs.daily_costs
                WHERE {profile_condition} AND day >= $2 AND day < $3 {job_condition}
                UNION ALL
                SELECT profile_id, (occurred_at AT TIME ZONE 'UTC')::date, provider, model,
                       job_id, attributes ->> 'voice_id', priced, cost_usd, 1
                FROM costs.entries
                WHERE {profile_condition} {job_condition}
                  AND ((occurred_at >= $4 AND occurred_at < $5)
                       OR (occurred_at >= $6 AND occurred_at < $7))
            )
            SELECT {select}, sum(cost_usd) AS cost_usd, sum(line_count)::bigint AS line_count
            FROM lines
            GROUP BY {positions}
            ORDER BY {positions}
        """
        transaction = (
            self._pool.cross_profile_transaction()
            if profile_id is None
            else self._pool.transaction(profile_id, readonly=True)
        )
        async with transaction as connection:
            rows = await connection.fetch(
                query,
                profile_id,
                first_day,
                max(first_day, last_day),
                edge1_start,
                edge1_end,
                edge2_start,
                edge2_end,
                job_id,
            )
        return CostSummary(
            tuple(
                SummaryRow(
                    priced=row["priced"],
                    cost_usd=row["cost_usd"],
                    line_count=row["line_count"],
                    **{name: row[name] for name in fields},
                )
                for row in rows
            )
        )

    async def set_budget(self, profile_id: str, budget: Budget) -> BudgetStatus:
        """Creates or replaces the budget; a new limit or thresholds re-arm this period's
        alerts, so crossings are judged against the budget as it now is."""
        async with self._pool.transaction(profile_id) as connection:
            previous = await connection.fetchrow(
                "SELECT period, limit_usd, alert_thresholds FROM costs.budgets "
                "WHERE profile_id = $1 AND period = $2 FOR UPDATE",
                profile_id,
                str(budget.period),
            )
            await connection.execute(
                """
                INSERT INTO costs.budgets (profile_id, period, limit_usd, alert_thresholds)
                VALUES ($1, $2, $3, $4)
                ON CONFLICT (profile_id, period) DO UPDATE
                SET limit_usd = EXCLUDED.limit_usd, alert_thresholds = EXCLUDED.alert_thresholds,
                    update_time = clock_timestamp()
                """,
                profile_id,
                str(budget.period),
                budget.limit_usd,
                list(budget.alert_thresholds),
            )
            if previous is not None and _budget(previous) != budget:
                await connection.execute(
                    "DELETE FROM costs.budget_crossings WHERE profile_id = $1 AND period = $2",
                    profile_id,
                    str(budget.period),
                )
            (status,) = await _statuses(connection.fetch, profile_id, budget.period)
            return status

    async def count_for_deletion(self, profile_id: str) -> tuple[int, int]:
        """(budgets, cost lines) the profile holds. The lines are counted from the daily
        rollup, which counts every line as it is recorded: a row per day, model and job, not
        per line, so the count stays quick for a profile with millions of lines."""
        async with self._pool.transaction(profile_id, readonly=True) as connection:
            row = await connection.fetchrow(
                "SELECT (SELECT count(*) FROM costs.budgets WHERE profile_id = $1) AS budgets, "
                "(SELECT coalesce(sum(line_count), 0)::bigint FROM costs.daily_costs "
                "WHERE profile_id = $1) AS entries",
                profile_id,
            )
        return row["budgets"], row["entries"]

    async def delete_budgets(self, profile_id: str) -> int:
        """Deletes the profile's budgets and their crossings: how many budgets."""
        async with self._pool.transaction(profile_id) as connection:
            await connection.execute(
                "DELETE FROM costs.budget_crossings WHERE profile_id = $1", profile_id
            )
            return await connection.fetchval(
                "WITH deleted AS (DELETE FROM costs.budgets WHERE profile_id = $1 RETURNING 1) "
                "SELECT count(*) FROM deleted",
                profile_id,
            )

    async def get_budget(self, profile_id: str, period: BudgetPeriod) -> BudgetStatus:
        statuses = await self.budget_statuses(profile_id, period)
        if not statuses:
            raise NotFound(f"no {period} budget is set; set one with SetBudget")
        return statuses[0]

    async def budget_statuses(
        self, profile_id: str, period: BudgetPeriod | None = None
    ) -> list[BudgetStatus]:
        """The profile's budgets as they stand now (one period's, or every one), in one
        statement: costs.budget_statuses (migration 0006)."""
        return await _statuses(
            lambda query, *arguments: self._pool.call(profile_id, query, *arguments),
            profile_id,
            period,
        )


async def _statuses(
    fetch: Callable[..., Awaitable[list[asyncpg.Record]]],
    profile_id: str,
    period: BudgetPeriod | None,
) -> list[BudgetStatus]:
    """The profile's budgets and their spend now, read by costs.budget_statuses through
    `fetch` (one statement on its own, or one of a transaction's)."""
    bounds = _period_bounds(datetime.now(UTC))
    rows = await fetch(
        "SELECT * FROM costs.budget_statuses($1, $2, $3, $4, $5, $6)",
        profile_id,
        None if period is None else str(period),
        *_period_days(bounds),
    )
    statuses = []
    for row in rows:
        budget = _budget(row)
        statuses.append(BudgetStatus(budget, row["spent_usd"], *bounds[budget.period]))
    return statuses


def _period_bounds(now: datetime) -> dict[BudgetPeriod, tuple[datetime, datetime]]:
    """Each period's current [start, end) (BudgetPeriod.bounds), worked out once a call."""
    return {period: period.bounds(now) for period in BudgetPeriod}


def _period_days(bounds: dict[BudgetPeriod, tuple[datetime, datetime]]) -> tuple[date, ...]:
    """The current daily and monthly periods as [start, end) days: the bounds the schema's
    budget functions take (UTC)."""
    daily, monthly = bounds[BudgetPeriod.DAILY], bounds[BudgetPeriod.MONTHLY]
    return daily[0].date(), daily[1].date(), monthly[0].date(), monthly[1].date()


# A row's period as its BudgetPeriod: a lookup, where BudgetPeriod(value) runs Python per call.
_PERIODS = {period.value: period for period in BudgetPeriod}


def _budget(row: asyncpg.Record) -> Budget:
    return Budget(
        period=_PERIODS[row["period"]],
        limit_usd=row["limit_usd"],
        alert_thresholds=tuple(row["alert_thresholds"]),
    )
