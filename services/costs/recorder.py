"""Recording that never loses an acknowledged line: through the store, or into the spool
while the database is unreachable, replayed in the background once it is back."""

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import asyncpg

from services.costs.metrics import LINES_RECORDED
from services.costs.model import CostEntry, UsageLine
from services.costs.spool import LineRefused, Spool
from services.costs.store import CostStore
from services.runtime.call_context import require_profile_id, validate_profile_id
from services.runtime.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

# SQLSTATE classes that say "not now" rather than "never": connection (08), transaction
# rollback such as a deadlock (40), insufficient resources (53), object in use (55), operator
# intervention (57), system error (58). Replay retries these; any other refusal is the line's.
TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "55", "57", "58"})


class Recorder:
    def __init__(self, store: CostStore, spool: Spool, retry_seconds: float) -> None:
        self._store = store
        self._spool = spool
        self._retry_seconds = retry_seconds
        self._spooled = asyncio.Event()
        self._replayer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Opens the spool; replays what a previous run left there in the background, so that
        a long spool delays neither serving nor the probes, then whenever a line is spooled."""
        await self._spool.open()
        if not self._spool.is_empty():
            log.info("spool %s is not empty; replaying it", self._spool.path)
            self._spooled.set()
        self._replayer = asyncio.create_task(self._replay_forever())

    async def close(self) -> None:
        if self._replayer is not None:
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
        await self._spool.close()

    async def record(self, line: UsageLine) -> CostEntry | None:
        """The recorded line (the first one for a repeated request_id), or None if spooled."""
        try:
            entry, new = await self._store.record(require_profile_id(), line)
        except Unavailable:
            await self._spool_lines([line])
            return None
        LINES_RECORDED.labels("stored" if new else "duplicate").inc()
        return entry

    async def record_many(self, lines: Sequence[UsageLine]) -> tuple[int, int]:
        """(accepted, spooled): spooled lines count as accepted; duplicates are neither."""
        try:
            stored = await self._store.record_many(require_profile_id(), lines)
        except Unavailable:
            await self._spool_lines(lines)
            return len(lines), len(lines)
        LINES_RECORDED.labels("stored").inc(stored)
        LINES_RECORDED.labels("duplicate").inc(len(lines) - stored)
        return stored, 0

    async def _spool_lines(self, lines: Sequence[UsageLine]) -> None:
        await self._spool.append(require_profile_id(), lines)
        LINES_RECORDED.labels("spooled").inc(len(lines))
        self._spooled.set()

    async def replay(self) -> int:
        """Records everything spooled; Unavailable while the database is still down."""
        return await self._spool.drain(self._record_for)

    async def _record_for(self, profile_id: str, lines: list[UsageLine]) -> None:
        try:
            await self._store.record_many(validate_profile_id(profile_id), lines)
        except InvalidArgument as error:  # a malformed profile id
            raise LineRefused(str(error)) from error
        except asyncpg.PostgresError as error:
            if (error.sqlstate or "")[:2] in TRANSIENT_SQLSTATE_CLASSES:
                raise
            raise LineRefused(f"{type(error).__name__}: {error}") from error

    async def _replay_forever(self) -> None:
        while True:
            await self._spooled.wait()
            self._spooled.clear()
            try:
                await self.replay()
            except Unavailable:
                self._spooled.set()
                await self._pause()
            except Exception:
                log.exception("spool replay failed; retrying in %.1fs", self._retry_seconds)
                self._spooled.set()
                await self._pause()

    async def _pause(self) -> None:
        """Waits before the next try, unless the loop was asked to stop meanwhile (close):
        a request to stop that met a failing connect can surface as that failure, and the
        request is then spent; sleeping on would make close wait forever."""
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError
        await asyncio.sleep(self._retry_seconds)
