"""How leases are given and taken back (LeaseJobs, migration 0007): the policy a replica
applies, read from the environment, and the sweep that ends expired leases.

Every replica sweeps: jobs.reclaim_leases moves each expired job once however many sweeps
run at the same moment, so there is nothing to elect.
"""

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from services.jobs.store import JobStore
from services.runtime.errors import DomainError
from services.runtime.settings import env_float, env_int

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeasePolicy:
    # How often a replica looks for expired leases (JOBS_LEASE_SWEEP_SECONDS): a job whose
    # worker died waits its lease's end and at most this long to be PENDING again.
    sweep_seconds: float = 5.0
    # The backoff before an expired job may be leased again: this doubled for each attempt
    # made (JOBS_RETRY_BASE_SECONDS), at most JOBS_RETRY_MAX_SECONDS.
    retry_base_seconds: float = 10.0
    retry_max_seconds: float = 3600.0
    # Each profile's jobs in PROCESSING that leasing will not go past (0: no cap;
    # JOBS_MAX_PROCESSING_PER_PROFILE), so that one profile cannot hold every worker.
    max_processing_per_profile: int = 0
    # Expired leases ended per statement: a backlog is worked off in batches.
    sweep_batch: int = 500

    @classmethod
    def from_environment(cls) -> "LeasePolicy":
        return cls(
            sweep_seconds=env_float("JOBS_LEASE_SWEEP_SECONDS", cls.sweep_seconds),
            retry_base_seconds=env_float("JOBS_RETRY_BASE_SECONDS", cls.retry_base_seconds),
            retry_max_seconds=env_float("JOBS_RETRY_MAX_SECONDS", cls.retry_max_seconds),
            max_processing_per_profile=env_int(
                "JOBS_MAX_PROCESSING_PER_PROFILE", cls.max_processing_per_profile
            ),
        )


class LeaseSweeper:
    """A task that ends expired leases every `policy.sweep_seconds`, and again at once while
    it finds a full batch."""

    def __init__(self, store: JobStore, policy: LeasePolicy) -> None:
        self._store = store
        self._policy = policy
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="jobs-lease-sweep")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def sweep(self) -> int:
        """One batch: how many jobs it moved."""
        policy = self._policy
        return await self._store.reclaim_leases(
            policy.sweep_batch, policy.retry_base_seconds, policy.retry_max_seconds
        )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._policy.sweep_seconds)
            moved = self._policy.sweep_batch
            while moved == self._policy.sweep_batch:  # a backlog: the next batch at once
                moved = await self._sweep_logged()

    async def _sweep_logged(self) -> int:
        try:
            moved = await self.sweep()
        except DomainError as error:  # the database is down or busy: next time
            log.warning("lease sweep failed: %s", error)
            return 0
        if moved:
            log.info("lease sweep: %d expired lease(s) ended", moved)
        return moved
