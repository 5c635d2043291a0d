"""The server interceptor every service runs: who is calling, for which profile; logging.

For each RPC it reads and validates `x-profile-id`, authorizes the caller, scopes the call to
that profile, turns domain errors into gRPC status codes and writes one access line. Health and
reflection are exempt so that probes and `grpcurl list` need no profile.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc.aio import ServicerContext

from services.runtime import errors
from services.runtime.call_context import CallScope, profile_id_from_metadata

access_log = logging.getLogger("services.access")
log = logging.getLogger(__name__)

EXEMPT_SERVICE_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

STATUS_CODES: dict[type[errors.DomainError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Conflict: grpc.StatusCode.ABORTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}

Authorizer = Callable[[str, ServicerContext, str], Awaitable[None]]


async def allow_any_caller(profile_id: str, context: ServicerContext, method: str) -> None:
    """Trusts `x-profile-id` as sent (local debugging with grpcurl)."""


def status_code_for(error: errors.DomainError) -> grpc.StatusCode:
    for error_type in type(error).__mro__:
        if error_type in STATUS_CODES:
            return STATUS_CODES[error_type]
    return grpc.StatusCode.INTERNAL


class ProfileInterceptor(grpc.aio.ServerInterceptor):
    """Runs before every handler of every service.

    `authorize` is the one place where the proof that the caller may act for the profile
    (signed tokens, an operator scope) is checked; it raises Unauthenticated or
    PermissionDenied. Handlers never see a call it refused.
    """

    def __init__(self, authorize: Authorizer = allow_any_caller) -> None:
        self._authorize = authorize
        # Wrapping costs more than a lookup; handlers are fixed once a server starts.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        if handler is None or method.startswith(EXEMPT_SERVICE_PREFIXES):
            return handler
        wrapped = _wrap_handler(handler, _CallPipeline(method, self._authorize))
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class _CallPipeline:
    """What happens around one method's handler on every call."""

    __slots__ = ("_authorize", "method")

    def __init__(self, method: str, authorize: Authorizer) -> None:
        self.method = method
        self._authorize = authorize

    async def enter(self, context: ServicerContext, started: float) -> CallScope:
        """The call's scope, or an abort (logged) when the caller is refused."""
        try:
            profile_id = profile_id_from_metadata(context.invocation_metadata())
            await self._authorize(profile_id, context, self.method)
        except errors.DomainError as error:
            code = status_code_for(error)
            self.log_access(code, started)
            await context.abort(code, str(error))
        return CallScope(profile_id, context.time_remaining())

    def outcome(
        self, context: ServicerContext, error: BaseException
    ) -> tuple[grpc.StatusCode, str | None]:
        """The status a failed call ends with, and the message to abort with where the error
        is one this pipeline answers (None: let gRPC finish the call as it is)."""
        if isinstance(error, grpc.aio.AbortError):
            return context.code() or grpc.StatusCode.UNKNOWN, None
        if isinstance(error, asyncio.CancelledError | GeneratorExit):
            return grpc.StatusCode.CANCELLED, None
        if isinstance(error, errors.DomainError):
            return status_code_for(error), str(error)
        if isinstance(error, Exception):
            log.error("%s failed", self.method, exc_info=error)
            return grpc.StatusCode.INTERNAL, "internal error; see the server log"
        return grpc.StatusCode.UNKNOWN, None

    def log_access(self, code: grpc.StatusCode, started: float) -> None:
        """One line per RPC: method, status and duration; never a message body."""
        elapsed_ms = (time.perf_counter() - started) * 1000
        access_log.info(
            "%s %s %.1fms",
            self.method,
            code.name,
            elapsed_ms,
            extra={"method": self.method, "status": code.name, "duration_ms": round(elapsed_ms, 2)},
        )


def _wrap_handler(handler: grpc.RpcMethodHandler, call: _CallPipeline) -> grpc.RpcMethodHandler:
    """The same handler run inside the call pipeline; the call type is kept."""
    if handler.response_streaming:
        inner_stream = handler.unary_stream or handler.stream_stream

        async def streaming(request_or_iterator: Any, context: ServicerContext) -> Any:
            started = time.perf_counter()
            scope = await call.enter(context, started)
            code = grpc.StatusCode.OK
            try:
                async for response in inner_stream(request_or_iterator, context):
                    yield response
            except BaseException as error:
                code, message = call.outcome(context, error)
                if message is None:
                    raise
                await context.abort(code, message)
            finally:
                call.log_access(code, started)
                scope.close()

        behavior: Any = streaming
        factory = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )
    else:
        inner_unary = handler.unary_unary or handler.stream_unary

        async def unary(request_or_iterator: Any, context: ServicerContext) -> Any:
            started = time.perf_counter()
            scope = await call.enter(context, started)
            code = grpc.StatusCode.OK
            try:
                return await inner_unary(request_or_iterator, context)
            except BaseException as error:
                code, message = call.outcome(context, error)
                if message is None:
                    raise
                await context.abort(code, message)
            finally:
                call.log_access(code, started)
                scope.close()

        behavior = unary
        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
    return factory(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
