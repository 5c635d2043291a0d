"""A replica's periodic sweeps (expired leases, finished jobs past their retention): a batch
every so often, and the next batch at once while a batch comes back full.

Every replica sweeps: each sweep's statement acts on a row once however many run at the
same moment, so there is nothing to elect.
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from services.runtime.errors import DomainError

log = logging.getLogger(__name__)


class Sweeper:
    """Runs `sweep` (one batch of at most `batch` rows: how many it acted on) every
    `seconds`, sleeping first; logs what each batch did as `what` ("%d expired lease(s)
    ended")."""

    def __init__(
        self,
        name: str,
        seconds: float,
        batch: int,
        sweep: Callable[[], Awaitable[int]],
        what: str,
    ) -> None:
        self.name = name
        self._seconds = seconds
        self._batch = batch
        self._sweep = sweep
        self._what = what
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"jobs-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._seconds)
            done = self._batch
            while done == self._batch:  # a backlog: the next batch at once
                done = await self._sweep_logged()

    async def _sweep_logged(self) -> int:
        try:
            done = await self._sweep()
        except DomainError as error:  # the database is down or busy: next time
            log.warning("%s failed: %s", self.name, error)
            return 0
        if done:
            log.info("%s: " + self._what, self.name, done)
        return done
