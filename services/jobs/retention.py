"""How long finished jobs are kept (JOBS_RETENTION_DAYS, off by default): a sweep on every
replica deletes the finished jobs (COMPLETED, FAILED, CANCELLED) whose last change is older
than that, in batches (jobs.delete_finished_jobs, migration 0008). A job that is pending,
processing or changed within the retention is never touched.
"""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from services.jobs.store import JobStore
from services.jobs.sweeps import Sweeper
from services.runtime.settings import env_float, env_int


@dataclass(frozen=True)
class RetentionPolicy:
    # Finished jobs older than this many days are deleted (JOBS_RETENTION_DAYS); 0 keeps
    # every job.
    days: float = 0.0
    # How often a replica looks for them (JOBS_RETENTION_SWEEP_SECONDS).
    sweep_seconds: float = 300.0
    # Jobs deleted per statement: a backlog is worked off in small batches, each a short
    # transaction that holds few locks.
    sweep_batch: int = 500

    @classmethod
    def from_environment(cls) -> "RetentionPolicy":
        policy = cls(
            days=env_float("JOBS_RETENTION_DAYS", cls.days),
            sweep_seconds=env_float("JOBS_RETENTION_SWEEP_SECONDS", cls.sweep_seconds),
            sweep_batch=env_int("JOBS_RETENTION_SWEEP_BATCH", cls.sweep_batch),
        )
        if policy.days < 0 or policy.sweep_seconds <= 0 or policy.sweep_batch <= 0:
            raise SystemExit(
                "JOBS_RETENTION_DAYS must not be negative (0: keep every job), and "
                "JOBS_RETENTION_SWEEP_SECONDS and JOBS_RETENTION_SWEEP_BATCH must be above 0"
            )
        return policy


def retention_sweeper(store: JobStore, policy: RetentionPolicy) -> Sweeper | None:
    """The sweep that deletes finished jobs past the retention; None when jobs are kept."""
    if not policy.days:
        return None

    async def sweep() -> int:
        before = datetime.now(UTC) - timedelta(days=policy.days)
        return await store.delete_finished_jobs(before, policy.sweep_batch)

    return Sweeper(
        "retention sweep",
        policy.sweep_seconds,
        policy.sweep_batch,
        sweep,
        f"%d finished job(s) older than {policy.days:g} days deleted",
    )
