"""Rebuilding a gRPC method handler around a new behavior, keeping its call type, and the
interceptor base that does so once per method."""

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def behavior_of(handler: grpc.RpcMethodHandler) -> Any:
    """The handler's function, whatever its call type. A response-streaming one is an async
    generator, or a coroutine function that writes with context.write (health's Watch)."""
    return (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )


def with_behavior(handler: grpc.RpcMethodHandler, behavior: Any) -> grpc.RpcMethodHandler:
    """A handler of the same call type and serializers that runs `behavior` instead."""
    factory = _FACTORIES[handler.request_streaming, handler.response_streaming]
    return factory(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that wraps each method's handler once and reuses the wrapping:
    handlers are fixed once a server starts, and wrapping costs more than a lookup. (A
    handler an inner interceptor rebuilds on every call is wrapped again each time.)"""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler to run for `method` instead of `handler` (or `handler` itself)."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class InterceptorChain(WrappingInterceptor):
    """Several wrapping interceptors run as one, the first outermost. grpc.aio's own work per
    interceptor costs about as much as a whole no-op handler's share of a call, so the
    suite's interceptors go through it once."""

    def __init__(self, *links: WrappingInterceptor) -> None:
        super().__init__()
        self._links = links

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        for link in reversed(self._links):
            handler = link.wrap(method, handler)
        return handler
