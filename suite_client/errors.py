"""The few exceptions a call to the suite raises instead of a bare grpc.aio.AioRpcError.

Each is also the server runtime's domain error of the same name, so a service that calls
another and lets the error through answers its own caller with the same status code.

| status code                          | exception          | what to do                          |
|--------------------------------------|--------------------|-------------------------------------|
| NOT_FOUND                            | NotFound           | nothing to retry: it does not exist |
| INVALID_ARGUMENT, OUT_OF_RANGE       | InvalidArgument    | fix the request                     |
| ABORTED, ALREADY_EXISTS              | Conflict           | re-read, then retry                 |
| FAILED_PRECONDITION                  | FailedPrecondition | change the state first              |
| RESOURCE_EXHAUSTED                   | ResourceExhausted  | wait retry_after_seconds, then retry|
| UNAUTHENTICATED                      | Unauthenticated    | send a (valid) profile              |
| PERMISSION_DENIED                    | PermissionDenied   | act for a profile you may act for   |
| DEADLINE_EXCEEDED                    | DeadlineExceeded   | retry with a longer deadline        |
| UNAVAILABLE and every other code     | Unavailable        | retry later (already retried once   |
|                                      |                    | or more by the channel)             |

Every one has `retry_after_seconds`: the delay the server asked for in a google.rpc.RetryInfo
of the status details (for example the profile's fair share of a replica is in use), or None.
"""

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.runtime import errors


class SuiteError(errors.DomainError):
    """A call to a suite service ended with a status other than OK."""

    def __init__(
        self,
        method: str,
        code: grpc.StatusCode,
        details: str | None,
        retry_after_seconds: float | None = None,
    ) -> None:
        self.method = method
        self.code = code
        self.details = details or ""
        super().__init__(f"{method} answered {code.name}: {self.details}")
        self.retry_after_seconds = retry_after_seconds


class NotFound(SuiteError, errors.NotFound):
    pass


class InvalidArgument(SuiteError, errors.InvalidArgument):
    pass


class Conflict(SuiteError, errors.Conflict):
    pass


class FailedPrecondition(SuiteError, errors.FailedPrecondition):
    pass


class ResourceExhausted(SuiteError, errors.ResourceExhausted):
    pass


class Unauthenticated(SuiteError, errors.Unauthenticated):
    pass


class PermissionDenied(SuiteError, errors.PermissionDenied):
    pass


class Unavailable(SuiteError, errors.Unavailable):
    pass


class DeadlineExceeded(Unavailable, errors.DeadlineExceeded):
    pass


_BY_CODE: dict[grpc.StatusCode, type[SuiteError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.ABORTED: Conflict,
    grpc.StatusCode.ALREADY_EXISTS: Conflict,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """Seconds the server asked the caller to wait (google.rpc.RetryInfo), or None."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # status details that contradict the status: not to be trusted
        return None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            return retry.retry_delay.ToNanoseconds() / 1e9
    return None


def error_from(method: str, error: grpc.aio.AioRpcError) -> SuiteError:
    """The exception for a failed call; use it on streams, whose errors arrive while reading."""
    exception_type = _BY_CODE.get(error.code(), Unavailable)
    return exception_type(method, error.code(), error.details(), retry_delay(error))


def _method_name(details: grpc.aio.ClientCallDetails) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else method


class _UnaryResponseErrors(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        call = await continuation(details, request)
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            raise error_from(_method_name(details), error) from None


class _StreamRequestErrors(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        call = await continuation(details, requests)
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            raise error_from(_method_name(details), error) from None


def error_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Turn the status of calls with a single response into these exceptions."""
    return [_UnaryResponseErrors(), _StreamRequestErrors()]
