"""The Costs service's own Prometheus metrics (the runtime serves them with the gRPC ones).
Never a profile label: what each profile spends is what the service itself answers."""

from prometheus_client import Counter, Gauge

LINES_RECORDED = Counter(
    "costs_lines_recorded_total",
    "Usage lines by outcome: stored, duplicate (request_id already recorded) or spooled "
    "(kept on local disk while the database is unreachable).",
    ["outcome"],
)
SPOOL_LINES = Gauge(
    "costs_spool_lines",
    "Lines in the local spool waiting for the database (steadily above 0: replay is failing).",
    multiprocess_mode="livesum",
)
SPOOL_DEAD_LETTERED = Counter(
    "costs_spool_dead_lettered_total",
    "Spooled lines moved to the dead-letter file instead of the database, by reason: "
    "unreadable (cannot be parsed) or refused (the database refuses the line for good). "
    "Above 0: see the log line, fix the cause, append the file to the spool.",
    ["reason"],
)
