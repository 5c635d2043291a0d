"""The few errors domain code raises.

Stores and servicers raise these; the server interceptor alone turns them into gRPC status
codes, so no store knows about gRPC. The message is shown to the caller: make it actionable
and never put a secret in it.
"""


class DomainError(Exception):
    """Base of the errors a caller can act on."""

    # How long the caller should wait before retrying, when the error knows.
    retry_after_seconds: float | None = None


class InvalidArgument(DomainError):
    """The request itself is malformed; retrying it unchanged cannot succeed."""


class NotFound(DomainError):
    """The resource does not exist for this profile (or belongs to another one)."""


class Conflict(DomainError):
    """A concurrent change won (for example an etag mismatch); re-read and retry."""


class FailedPrecondition(DomainError):
    """The system is not in a state that allows this call (for example a finished job)."""


class ResourceExhausted(DomainError):
    """A quota or rate limit refuses the call for now.

    `retry_after_seconds` reaches the caller as a google.rpc.RetryInfo in the status details;
    say the delay in the message too ("retry in 30s"): grpcurl users read the message.
    """

    def __init__(self, message: str, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class Unavailable(DomainError):
    """A dependency (the database, a third-party API) cannot be reached; retry later."""


class DeadlineExceeded(Unavailable):
    """The call's deadline ran out while a dependency was still working on it (waiting for a
    database connection, a statement cancelled at the deadline); retry with a longer one."""


class Unauthenticated(DomainError):
    """The call does not say, or cannot prove, who makes it."""


class PermissionDenied(DomainError):
    """The caller is known but may not act for this profile."""
