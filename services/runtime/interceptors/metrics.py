"""The gRPC server metrics: every RPC counted and timed for Prometheus.

Metric and label names are those of the Go and Java gRPC Prometheus interceptors
(go-grpc-prometheus), so their dashboards and alerts work unchanged. The profile
interceptor's pipeline keeps them for the calls it handles, refused ones included, in the same
wrapper as its own work; `counted` keeps them for the methods it exempts (health, reflection).
"""

import asyncio
import inspect
import time
from typing import Any

import grpc
from grpc.aio import ServicerContext
from prometheus_client import Counter, Histogram

from services.runtime.interceptors.handlers import behavior_of, with_behavior

_LABELS = ["grpc_type", "grpc_service", "grpc_method"]

STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _LABELS)
HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, whatever their status.",
    [*_LABELS, "grpc_code"],
)
HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its end, as the server sees it.",
    _LABELS,
)


def _grpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


def _code_of(context: ServicerContext, error: BaseException) -> grpc.StatusCode:
    if isinstance(error, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class MethodMetrics:
    """One method's label children, made once: `labels()` costs more than an increment."""

    __slots__ = ("_handled", "_labels", "_seconds", "_started")

    def __init__(self, method: str, handler: grpc.RpcMethodHandler) -> None:
        service, _, name = method.lstrip("/").rpartition("/")
        self._labels = (_grpc_type(handler), service, name)
        self._started = STARTED.labels(*self._labels)
        self._seconds = HANDLING_SECONDS.labels(*self._labels)
        self._handled: dict[grpc.StatusCode, Any] = {}

    def start(self) -> float:
        self._started.inc()
        return time.perf_counter()

    def finish(self, code: grpc.StatusCode, elapsed_seconds: float) -> None:
        self._seconds.observe(elapsed_seconds)
        handled = self._handled.get(code)
        if handled is None:
            handled = self._handled[code] = HANDLED.labels(*self._labels, code.name)
        handled.inc()


def counted(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The handler, with its calls counted and timed."""
    metrics = MethodMetrics(method, handler)
    inner = behavior_of(handler)
    if inspect.isasyncgenfunction(inner):

        async def streaming(request_or_iterator: Any, context: ServicerContext) -> Any:
            started = metrics.start()
            code = grpc.StatusCode.OK
            try:
                async for response in inner(request_or_iterator, context):
                    yield response
                code = context.code() or code
            except BaseException as error:
                code = _code_of(context, error)
                raise
            finally:
                metrics.finish(code, time.perf_counter() - started)

        return with_behavior(handler, streaming)

    async def awaited(request_or_iterator: Any, context: ServicerContext) -> Any:
        started = metrics.start()
        code = grpc.StatusCode.OK
        try:
            response = await inner(request_or_iterator, context)
            code = context.code() or code
            return response
        except BaseException as error:
            code = _code_of(context, error)
            raise
        finally:
            metrics.finish(code, time.perf_counter() - started)

    return with_behavior(handler, awaited)
