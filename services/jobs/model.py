"""A job, independent of gRPC and SQL. The rules of its life (status moves forward only, a
final status never changes) are kept where a change is made, in one statement: the schema's
jobs.check_transition (migrations/0005_call_functions.sql)."""

import enum
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from services.runtime.errors import InvalidArgument


class JobStatus(enum.StrEnum):
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})

# The fields UpdateJob may change, as named in its update_mask.
UPDATABLE_FIELDS = ("status", "progress", "message", "data", "result", "error")


# A Job, and the parts it is made of, are named tuples: immutable as a frozen dataclass is,
# and made in a fraction of its CPU (a frozen dataclass sets each field through
# object.__setattr__), which counts on every call that returns a job.


class Document(NamedTuple):
    """A job's `data` or `result`: a JSON object, and the protobuf Struct bytes it travels as.

    A reply is built from the bytes when they are known: protobuf's own conversion of a dict
    to a Struct runs in Python at about 1.2 µs a value (6 ms for a job at its value budget),
    parsing the bytes in C at a thirtieth of that. Read from the database, a Document has the
    bytes and no values, or (a row written without the bytes: before migration 0004, or by
    hand in SQL) the values and no bytes; written, it has both.
    """

    values: dict[str, Any] | None = None
    encoded: bytes | None = None


EMPTY_DOCUMENT = Document(values={}, encoded=b"")


class Schedule(NamedTuple):
    """When and in what order a job is leased (LeaseJobs), and how many leases it may have."""

    run_after: datetime | None = None
    priority: int = 0
    max_attempts: int = 5


class Lease(NamedTuple):
    """The lease a job is held under. `lease_id`, the holder's proof, is known only to
    LeaseJobs' reply."""

    worker: str
    expire_time: datetime
    lease_id: uuid.UUID | None = None


class Attempt(NamedTuple):
    """One lease of a job, as its history keeps it."""

    attempt: int
    worker: str
    start_time: datetime
    end_time: datetime | None = None
    outcome: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True)
class Queue:
    """One kind's pending and leased jobs of one profile (GetQueueStats)."""

    kind: str
    profile_id: str
    pending: int
    ready: int
    oldest_pending_create_time: datetime | None
    leased: int


@dataclass(frozen=True, slots=True)
class HeldLease:
    """A job held under a lease, as an operator sees it: no lease_id."""

    job_id: uuid.UUID
    profile_id: str
    kind: str
    worker: str
    expire_time: datetime
    attempt: int


class Job(NamedTuple):
    job_id: uuid.UUID
    profile_id: str
    kind: str
    status: JobStatus
    progress: int
    message: str
    data: Document
    result: Document
    error: str
    create_time: datetime
    update_time: datetime
    version: int
    schedule: Schedule = Schedule()
    attempt: int = 0
    lease: Lease | None = None
    attempts: tuple[Attempt, ...] = ()

    @property
    def etag(self) -> str:
        return str(self.version)


@dataclass(frozen=True, slots=True)
class JobFilter:
    """ListJobs filters; empty means no restriction."""

    statuses: tuple[JobStatus, ...] = ()
    kind: str = ""
    create_time_start: datetime | None = None
    create_time_end: datetime | None = None

    def as_key(self) -> list[Any]:
        """A stable, JSON-friendly form, so a page token can name the filters it was made for."""
        return [
            sorted(self.statuses),
            self.kind,
            self.create_time_start and self.create_time_start.isoformat(),
            self.create_time_end and self.create_time_end.isoformat(),
        ]


@dataclass(frozen=True, slots=True)
class JobChanges:
    """The new values of the fields named by an update mask."""

    values: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.values) - set(UPDATABLE_FIELDS)
        if unknown:
            raise InvalidArgument(
                f"update_mask names fields that cannot be updated: {', '.join(sorted(unknown))}; "
                f"allowed: {', '.join(UPDATABLE_FIELDS)}"
            )
        progress = self.values.get("progress")
        if progress is not None and not 0 <= progress <= 100:
            raise InvalidArgument(f"progress must be between 0 and 100, got {progress}")
