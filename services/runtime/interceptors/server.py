"""The server interceptor every service runs: who is calling, for which profile; logging.

For each RPC it reads and validates `x-profile-id`, authorizes the caller, scopes the call to
that profile, turns domain errors into gRPC status codes and writes one access line. Health and
reflection are exempt so that probes and `grpcurl list` need no profile.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from grpc.aio import ServicerContext

from services.runtime import errors
from services.runtime.call_context import profile_id_from_metadata, profile_scope

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

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(EXEMPT_SERVICE_PREFIXES):
            return handler
        return _wrap_handler(handler, lambda context: self._serve_call(context, method))

    @asynccontextmanager
    async def _serve_call(self, context: ServicerContext, method: str) -> AsyncIterator[None]:
        started = time.perf_counter()
        try:
            profile_id = profile_id_from_metadata(context.invocation_metadata())
            await self._authorize(profile_id, context, method)
        except errors.DomainError as error:
            code = status_code_for(error)
            _log_access(method, code, started)
            await context.abort(code, str(error))
        with profile_scope(profile_id, context.time_remaining()):
            code = grpc.StatusCode.OK
            try:
                yield
            except errors.DomainError as error:
                code = status_code_for(error)
                await context.abort(code, str(error))
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("%s failed", method)
                await context.abort(code, "internal error; the server log has the details")
            finally:
                _log_access(method, code, started)


def _log_access(method: str, code: grpc.StatusCode, started: float) -> None:
    """One line per RPC: method, status and duration; never a message body."""
    elapsed_ms = (time.perf_counter() - started) * 1000
    access_log.info("%s %s %.1fms", method, code.name, elapsed_ms)


Behavior = Callable[..., Any]
CallScope = Callable[[ServicerContext], Any]


def _wrap_handler(handler: grpc.RpcMethodHandler, scope: CallScope) -> grpc.RpcMethodHandler:
    """The same handler, each call run inside `scope(context)`; the call type is kept."""
    if handler.response_streaming:
        inner = handler.unary_stream or handler.stream_stream

        async def streaming(request_or_iterator: Any, context: ServicerContext) -> Any:
            async with scope(context):
                async for response in inner(request_or_iterator, context):
                    yield response

        behavior: Behavior = streaming
        factory = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )
    else:
        inner = handler.unary_unary or handler.stream_unary

        async def unary(request_or_iterator: Any, context: ServicerContext) -> Any:
            async with scope(context):
                return await inner(request_or_iterator, context)

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
