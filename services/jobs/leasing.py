"""How leases are given and taken back (LeaseJobs, migration 0007): the policy a replica
applies, read from the environment, and the sweep that ends expired leases.

Every replica sweeps (services.jobs.sweeps): jobs.reclaim_leases moves each expired job
once however many sweeps run at the same moment.
"""

from dataclasses import dataclass

from services.jobs.store import JobStore
from services.jobs.sweeps import Sweeper
from services.runtime.settings import env_float, env_int


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


def lease_sweeper(store: JobStore, policy: LeasePolicy) -> Sweeper:
    """Ends expired leases every `policy.sweep_seconds` (jobs.reclaim_leases)."""

    async def sweep() -> int:
        return await store.reclaim_leases(
            policy.sweep_batch, policy.retry_base_seconds, policy.retry_max_seconds
        )

    return Sweeper(
        "lease sweep", policy.sweep_seconds, policy.sweep_batch, sweep, "%d expired lease(s) ended"
    )
