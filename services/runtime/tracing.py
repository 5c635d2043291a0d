"""OpenTelemetry traces: one trace across the services a call passes through.

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the OTLP exporter reads it and the other
`OTEL_*` variables itself). When a tracer provider is installed, servers and suite_client
channels add the opentelemetry-instrumentation-grpc interceptors, server spans carry the
calling profile as `app.profile_id`, and each tenant-scoped transaction is a child span.
When it is not, none of this is on the call path.
"""

import inspect
import os
from typing import Any

import grpc
from grpc.aio import ServicerContext
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.instrumentation.grpc.filters import any_of, health_check, negate, service_prefix

from services.runtime.call_context import current_profile_id
from services.runtime.interceptors.handlers import WrappingInterceptor, behavior_of, with_behavior

PROFILE_ATTRIBUTE = "app.profile_id"  # the name the tenant scoping gives it in Postgres

# Probes and grpcurl's reflection are not worth a trace.
_TRACED_CALLS = negate(any_of(health_check(), service_prefix("grpc.reflection")))


def configure_tracing(service: str) -> None:
    """Exports spans over OTLP (gRPC) when OTEL_EXPORTER_OTLP_ENDPOINT is set, as
    OTEL_SERVICE_NAME or the service's name."""
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or service
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def tracing_enabled() -> bool:
    """True once a real tracer provider is installed (configure_tracing, or a test's)."""
    return not isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider
    )


def outer_server_interceptors(traced: bool) -> list[grpc.aio.ServerInterceptor]:
    """The span of each call (from the caller's trace when it sends one); placed before the
    profile interceptor so that refused calls are traced too."""
    return [aio_server_interceptor(filter_=_TRACED_CALLS)] if traced else []


def inner_server_interceptors(traced: bool) -> list[WrappingInterceptor]:
    """Names the profile on the call's span; placed after the profile interceptor."""
    return [_ProfileSpanInterceptor()] if traced else []


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """A client span per call, its context sent along in the metadata."""
    return aio_client_interceptors() if tracing_enabled() else []


def transaction_span(service: str, readonly: bool) -> Any:
    """A child span around one tenant-scoped transaction."""
    return trace.get_tracer(__name__).start_as_current_span(
        f"{service} transaction",
        kind=trace.SpanKind.CLIENT,
        attributes={
            "db.system.name": "postgresql",
            "db.transaction.readonly": readonly,
            PROFILE_ATTRIBUTE: current_profile_id() or "",
        },
    )


def _name_profile_on_span() -> None:
    profile_id = current_profile_id()
    if profile_id is not None:
        trace.get_current_span().set_attribute(PROFILE_ATTRIBUTE, profile_id)


class _ProfileSpanInterceptor(WrappingInterceptor):
    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return _naming_profile(handler)


def _naming_profile(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    inner = behavior_of(handler)
    if inspect.isasyncgenfunction(inner):

        async def streaming(request_or_iterator: Any, context: ServicerContext) -> Any:
            _name_profile_on_span()
            async for response in inner(request_or_iterator, context):
                yield response

        return with_behavior(handler, streaming)

    async def awaited(request_or_iterator: Any, context: ServicerContext) -> Any:
        _name_profile_on_span()
        return await inner(request_or_iterator, context)

    return with_behavior(handler, awaited)
