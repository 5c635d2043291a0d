"""Tenant-scoped access to a service's own Postgres schema.

Every transaction first runs `set_config('app.profile_id', …, true)` for the calling profile
and switches to the service's role, which neither owns the tables nor bypasses row-level
security. A query that forgets its `WHERE profile_id = …` still sees only that profile's rows.
The one exception is an operator's cross-profile read: a READ ONLY transaction that sets
`app.operator`, which a service's SELECT-only policy honours.

Nothing waits on the database forever: a connection is waited for at most the call's
remaining deadline and `acquire_timeout_seconds`, and every statement of the transaction runs
under a `statement_timeout` (set in the same round trip as BEGIN) of at most the deadline and
`statement_timeout_seconds`. Running out of the call's deadline is DeadlineExceeded; of the
pool's own bounds, Unavailable ("busy; retry").
"""

import asyncio
import contextlib
import json
import logging
import math
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import asyncpg

from services.runtime.call_context import current_caller, remaining_seconds
from services.runtime.errors import (
    Conflict,
    DeadlineExceeded,
    DomainError,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from services.runtime.metrics import POSTGRES_ERRORS
from services.runtime.shares import CROSS_PROFILE_KEY, ProfileShares
from services.runtime.tracing import tracing_enabled, transaction_span

log = logging.getLogger(__name__)


def _literal(value: str) -> str:
    """A SQL string literal. Only ever given a validated profile id or a role name."""
    if "\x00" in value:
        raise ValueError("NUL in a SQL literal")
    return "'" + value.replace("'", "''") + "'"


# Errors that mean "the database cannot be reached now", not "the query is wrong".
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    # asyncpg's protocol state on a connection that broke in the middle of a query.
    asyncpg.InternalClientError,
    TimeoutError,
)


async def _init_connection(connection: asyncpg.Connection) -> None:
    for json_type in ("json", "jsonb"):
        await connection.set_type_codec(
            json_type, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Release without asyncpg's default reset query: nothing here changes session state
    (scoping is transaction-local), so that round trip would buy nothing."""


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    application_name: str = "services",
    transaction_pooler: bool = False,
) -> asyncpg.Pool:
    """An asyncpg pool whose connections speak JSON for json and jsonb columns.

    Behind a pooler in transaction mode (`transaction_pooler`), a client connection's next
    transaction may run on another server connection, where the named prepared statements
    asyncpg caches do not exist: the cache is off, and each statement is prepared unnamed,
    which PgBouncer 1.18 keeps on one server until it has run (tests/test_pgbouncer.py).
    Nothing else the pool does needs a session: every setting is local to its transaction
    (set_config(…, true)) and a released connection is not reset."""
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        reset=_keep_session,
        server_settings={"application_name": application_name},
        statement_cache_size=0 if transaction_pooler else 100,
    )


class TenantScopedPool:
    """Hands out connections inside a transaction scoped to the current call's profile."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        role: str,
        service: str | None = None,
        *,
        acquire_timeout_seconds: float = 5.0,
        statement_timeout_seconds: float = 10.0,
        connections_per_profile: int = 0,
        traced: bool | None = None,
    ) -> None:
        self.pool = pool
        self.role = role
        self.service = service or role  # the `service` label of its metrics
        self.acquire_timeout_seconds = acquire_timeout_seconds
        self.statement_timeout_seconds = statement_timeout_seconds
        self._role_literal = _literal(role)
        # A transaction left idle (its caller stuck) ends, and frees its locks, after as long
        # as a statement may run.
        self._idle_timeout = (
            f", set_config('idle_in_transaction_session_timeout', "
            f"'{_milliseconds(statement_timeout_seconds)}', true)"
        )
        self._waiting = 0
        self._traced = tracing_enabled() if traced is None else traced
        # Each profile's share of the pool (0 lets one profile take every connection). Its
        # callers past it wait within the acquire bounds; how many can wait is bounded before
        # they get here, by the profile's calls in flight.
        self.connections_per_profile = connections_per_profile
        self.shares = ProfileShares(
            connections_per_profile,
            acquire_timeout_seconds,
            what="database connections",
            max_waiting=sys.maxsize,
        )

    def transaction(
        self, profile_id: str, *, readonly: bool = False
    ) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """A transaction that sees only the profile's rows, for work of several statements;
        one statement runs through `call`.

        Rolled back on any error or cancellation; connection failures surface as
        Unavailable so callers get a status they can retry on.
        """
        # BEGIN and the scoping go in one round trip; a transaction costs three in all.
        begin = (
            f"BEGIN{' READ ONLY' if readonly else ''}; "
            f"SELECT set_config('role', {self._role_literal}, true), "
            f"set_config('app.profile_id', {_literal(profile_id)}, true)"
        )
        return self._scoped(begin, profile_id)

    def cross_profile_transaction(self) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """A READ ONLY transaction that sees every profile's rows, for an operator's call only
        (PermissionDenied otherwise); the schema must have a SELECT policy on `app.operator`."""
        caller = current_caller()
        if caller is None or not caller.operator:
            raise PermissionDenied("reading across profiles needs a token with scope operator")
        begin = (
            "BEGIN READ ONLY; "
            f"SELECT set_config('role', {self._role_literal}, true), "
            "set_config('app.operator', 'on', true)"
        )
        return self._scoped(begin, CROSS_PROFILE_KEY)

    async def call(self, profile_id: str, query: str, *arguments: Any) -> list[asyncpg.Record]:
        """The rows of one statement run for the profile, in one round trip: `query` calls a
        function of the schema whose first step scopes the statement's own transaction to the
        profile (the role and app.profile_id, as `transaction`'s BEGIN does), so there is no
        BEGIN or COMMIT to send. Bounded as a transaction is: the wait for a connection, and
        the statement by asyncpg's timeout (which cancels it in Postgres), by the call's
        deadline. An error the function raises with an SU SQLSTATE is the DomainError it
        names (SU404 NotFound, SU409 Conflict, SU412 FailedPrecondition)."""
        bound = _StatementBound()
        span = transaction_span(self.service, False) if self._traced else _NO_SPAN
        with span, _ErrorsMapped(self.service, bound):
            connection = await self._acquire(profile_id)
            try:
                bound.measure(self)
                try:
                    return await connection.fetch(query, *arguments, timeout=bound.seconds)
                except TimeoutError:
                    raise asyncpg.QueryCanceledError("canceling statement due to timeout") from None
            finally:
                await self.pool.release(connection)
                self.shares.leave(profile_id)

    @asynccontextmanager
    async def _scoped(self, begin: str, share: str) -> AsyncIterator[asyncpg.Connection]:
        """Runs `begin` with the statement timeout, then commits, or rolls back on any error or
        cancellation."""
        bound = _StatementBound()
        span = (
            transaction_span(self.service, begin.startswith("BEGIN READ ONLY"))
            if self._traced
            else _NO_SPAN
        )
        with span, _ErrorsMapped(self.service, bound):
            connection = await self._acquire(share)
            try:
                bound.measure(self)
                await connection.execute(
                    f"{begin}, set_config('statement_timeout', "
                    f"'{_milliseconds(bound.seconds)}', true){self._idle_timeout}"
                )
                try:
                    yield connection
                except BaseException:
                    if not connection.is_closed():
                        try:
                            await connection.execute("ROLLBACK")
                        except Exception:
                            # Its state is unknown: it must never serve another call.
                            connection.terminate()
                    raise
                await connection.execute("COMMIT")
            finally:
                await self.pool.release(connection)
                self.shares.leave(share)

    def _bound(self, limit: float, doing: str) -> tuple[float, bool]:
        """At most `limit` seconds and the call's remaining deadline: the bound, and whether
        the deadline is what sets it. DeadlineExceeded when the deadline has passed."""
        remaining = remaining_seconds()
        if remaining is None or remaining >= limit:
            return limit, False
        if remaining <= 0:
            raise DeadlineExceeded(f"the call's deadline passed before {doing}")
        return remaining, True

    async def _acquire(self, share: str) -> asyncpg.Connection:
        """A connection of the pool, waited for within the bounds, once the profile holds
        fewer than its share; DeadlineExceeded or Unavailable ("busy") when none came in time.
        On success the caller owes `shares.leave(share)` after releasing the connection."""
        holding = self.shares.try_enter(share)
        try:
            if holding and self.pool.get_idle_size():
                # An idle connection is handed out at once: no timer to arm (it costs more
                # CPU than the rest of acquiring).
                return await self.pool.acquire()
            seconds, deadline_bound = self._bound(
                self.acquire_timeout_seconds, "waiting for a database connection"
            )
            self._waiting += 1
            try:
                async with asyncio.timeout(seconds) as timeout:
                    if not holding:
                        # Past its share: one profile's burst waits behind itself, for its
                        # own next release, not in front of other profiles.
                        await self.shares.enter_when_free(share, seconds)
                        holding = True
                    return await self.pool.acquire()
            except (TimeoutError, ResourceExhausted) as error:
                if isinstance(error, TimeoutError) and not timeout.expired():
                    raise  # connecting timed out: the database is unreachable
                raise _out_of_time(
                    deadline_bound,
                    "no database connection came free",
                    f"the database is busy: no connection came free in {seconds:g}s",
                ) from error
            finally:
                self._waiting -= 1
        except BaseException:
            if holding:
                self.shares.leave(share)
            raise

    def usage(self) -> dict[str, int]:
        """Connections by state, for the pool gauges."""
        size = self.pool.get_size()
        idle = self.pool.get_idle_size()
        return {
            "in_use": size - idle,
            "idle": idle,
            "max": self.pool.get_max_size(),
            "waiting": self._waiting,
        }

    async def is_reachable(self) -> bool:
        """True when a connection answers a trivial query."""
        try:
            async with self.pool.acquire(timeout=5) as connection:
                await connection.fetchval("SELECT 1", timeout=5)
        except CONNECTION_ERRORS:
            return False
        return True

    async def close(self) -> None:
        await self.pool.close()


class _StatementBound:
    """How long a statement may run: the pool's bound or the call's remaining deadline,
    measured once the connection is in hand (the wait for it has spent some)."""

    __slots__ = ("by_deadline", "seconds")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.by_deadline = False

    def measure(self, pool: TenantScopedPool) -> None:
        self.seconds, self.by_deadline = pool._bound(
            pool.statement_timeout_seconds, "running a database statement"
        )


class _ErrorsMapped:
    """Database errors as the statuses a caller can act on, counted under `service`. A class
    rather than a @contextmanager generator: it runs around every statement, and a
    generator's context manager costs three times the CPU to enter and leave."""

    __slots__ = ("_bound", "_service")

    def __init__(self, service: str, bound: _StatementBound) -> None:
        self._service = service
        self._bound = bound

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> bool:
        if error is None:
            return False
        if isinstance(error, CONNECTION_ERRORS):
            if _cancelled_meanwhile():
                raise asyncio.CancelledError from error
            POSTGRES_ERRORS.labels(self._service, "connection").inc()
            log.warning("database unavailable: %s", error)
            raise Unavailable("the database is unavailable; retry shortly") from error
        if isinstance(error, asyncpg.QueryCanceledError):
            # The statement timeout (or an administrator) cancelled a statement.
            POSTGRES_ERRORS.labels(self._service, "timeout").inc()
            raise _out_of_time(
                self._bound.by_deadline,
                "the database was still running a statement",
                f"a database statement ran longer than {self._bound.seconds:g}s",
            ) from error
        if isinstance(error, asyncpg.PostgresError):
            if domain_error := _DOMAIN_ERRORS.get(error.sqlstate or ""):
                raise domain_error(str(error)) from None
            POSTGRES_ERRORS.labels(self._service, "query").inc()
        return False


# A statement's span when tracing is off: one, entered by every statement.
_NO_SPAN = contextlib.nullcontext()


# What a schema's function raises for a caller's mistake (class SU, "suite"), as statuses.
_DOMAIN_ERRORS: dict[str, type[DomainError]] = {
    "SU404": NotFound,
    "SU409": Conflict,
    "SU412": FailedPrecondition,
}


def _cancelled_meanwhile() -> bool:
    """Whether the running task has been asked to stop. On Python 3.11, asyncio.wait_for
    (asyncpg's connect) can turn that request into a TimeoutError, which must not pass for an
    outage: a caller that catches Unavailable and waits would never stop."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _milliseconds(seconds: float) -> int:
    """Whole milliseconds for a Postgres timeout, rounded up: never 0, which means none."""
    return max(1, math.ceil(seconds * 1000))


def _out_of_time(deadline_bound: bool, before_deadline: str, busy: str) -> DomainError:
    if deadline_bound:
        return DeadlineExceeded(f"the call's deadline passed: {before_deadline}")
    return Unavailable(f"{busy}; retry shortly")
