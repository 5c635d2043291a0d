"""The Jobs service's own Prometheus metrics (the runtime serves them with the gRPC ones).
Never a profile label."""

from prometheus_client import Counter, Gauge

WATCH_CHANGES = Counter(
    "jobs_watch_changes_total",
    "Job changes read and built into a WatchJob reply, once for all of the job's watchers on "
    "this replica (changes that come faster than they are read are folded into one).",
)
WATCHERS = Gauge(
    "jobs_watchers",
    "WatchJob streams open on this replica (JOBS_WATCHERS_PER_REPLICA caps them).",
    multiprocess_mode="livesum",
)
