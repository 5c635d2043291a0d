"""Rebuilding a gRPC method handler around a new behavior, keeping its call type; the
interceptor base that does so once per method; and the registry that applies it as handlers
are registered."""

from collections.abc import Iterable
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


class WrappingInterceptor:
    """A server interceptor that wraps each method's handler in the work it does around
    every call. It is applied by an InterceptedHandlers as handlers are registered, not by
    grpc.aio per call."""

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler to run for `method` instead of `handler` (or `handler` itself)."""
        raise NotImplementedError


class InterceptorChain(WrappingInterceptor):
    """Several wrapping interceptors run as one, the first outermost."""

    def __init__(self, *links: WrappingInterceptor) -> None:
        self._links = links

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        for link in reversed(self._links):
            handler = link.wrap(method, handler)
        return handler


class InterceptedHandlers(grpc.GenericRpcHandler):
    """Where a server's services register their handlers, each wrapped by `interceptor`.

    It has the two methods that generated `add_*Servicer_to_server` functions call on a
    server, and the server serves it as its one generic handler. Handlers are wrapped when
    they are registered, so finding a call's handler costs a dictionary lookup. Through
    grpc.aio's own interceptor machinery it would cost a chain of coroutines per call, and
    grpc.aio's dispatch of methods registered by name waits on a future per method per call.
    """

    def __init__(self, interceptor: WrappingInterceptor) -> None:
        self._interceptor = interceptor
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []
        # What a generic handler gave for a method, and its wrapping: made once per handler.
        self._found: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        for name, handler in method_handlers.items():
            method = f"/{service_name}/{name}"
            self._handlers[method] = self._interceptor.wrap(method, handler)

    def add_generic_rpc_handlers(self, generic_handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        """Handlers looked up by method at call time, for methods not registered by name."""
        self._generic.extend(generic_handlers)

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is not None:
            return handler
        for generic in self._generic:
            handler = generic.service(handler_call_details)
            if handler is not None:
                return self._wrapped_found(method, handler)
        return None

    def _wrapped_found(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        found = self._found.get(method)
        if found is None or found[0] is not handler:
            found = self._found[method] = (handler, self._interceptor.wrap(method, handler))
        return found[1]
