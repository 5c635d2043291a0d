"""OpenTelemetry: one trace across PublishJob and the Jobs calls it makes, the profile on the
spans, transactions as child spans; and the OTLP export of a service process."""

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, format_trace_id

from tests.conftest import server_process
from tests.test_publisher_publish_job import completed_job, publish_request

PUBLISH_JOB = "/publisher.v1.PublisherService/PublishJob"
GET_JOB = "/jobs.v1.JobService/GetJob"
UPDATE_JOB = "/jobs.v1.JobService/UpdateJob"


@pytest.fixture
async def publish_job_trace(
    jobs_stub, publisher_stub, fake_postiz, postiz_profile, span_exporter
) -> list[ReadableSpan]:
    """The spans of one PublishJob's trace."""
    fake_postiz.files["traced.mp4"] = bytes(100)
    job = await completed_job(
        jobs_stub, postiz_profile.metadata, video_url=f"{fake_postiz.base_url}/files/traced.mp4"
    )
    span_exporter.clear()
    await publisher_stub.PublishJob(
        publish_request(job, postiz_profile), metadata=postiz_profile.metadata
    )
    spans = span_exporter.get_finished_spans()
    root = _one(spans, PUBLISH_JOB, SpanKind.SERVER)
    return [span for span in spans if span.context.trace_id == root.context.trace_id]


def _all(spans: list[ReadableSpan], name: str, kind: SpanKind) -> list[ReadableSpan]:
    found = [span for span in spans if span.name == name and span.kind == kind]
    assert found, [(span.name, span.kind) for span in spans]
    return found


def _one(spans: list[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    [found] = _all(spans, name, kind)
    return found


async def test_one_trace_spans_publish_job_and_the_jobs_calls_it_makes(publish_job_trace):
    # PublishJob reads the job, then reads it again and writes the result back.
    publish = _one(publish_job_trace, PUBLISH_JOB, SpanKind.SERVER)
    for method, calls in ((GET_JOB, 2), (UPDATE_JOB, 1)):
        clients = _all(publish_job_trace, method, SpanKind.CLIENT)
        servers = _all(publish_job_trace, method, SpanKind.SERVER)
        assert len(clients) == len(servers) == calls
        assert {s.parent.span_id for s in servers} == {c.context.span_id for c in clients}
        assert all(c.context.trace_id == publish.context.trace_id for c in clients)


async def test_server_spans_name_the_calling_profile(publish_job_trace, postiz_profile):
    profile_id = dict(postiz_profile.metadata)["x-profile-id"]
    for method in (PUBLISH_JOB, GET_JOB, UPDATE_JOB):
        for span in _all(publish_job_trace, method, SpanKind.SERVER):
            assert span.attributes["app.profile_id"] == profile_id


async def test_transactions_are_child_spans_of_the_call(publish_job_trace):
    for get_job in _all(publish_job_trace, GET_JOB, SpanKind.SERVER):
        children = [span for span in publish_job_trace if span.parent == get_job.context]
        assert [span.name for span in children] == ["jobs transaction"]
        assert children[0].attributes["db.system.name"] == "postgresql"
    assert any(span.name == "publisher transaction" for span in publish_job_trace)


async def test_log_lines_of_a_traced_call_carry_its_trace_id(
    jobs_stub, publisher_stub, fake_postiz, postiz_profile, span_exporter, caplog
):
    caplog.set_level(logging.INFO)
    fake_postiz.files["logged.mp4"] = bytes(100)
    job = await completed_job(
        jobs_stub, postiz_profile.metadata, video_url=f"{fake_postiz.base_url}/files/logged.mp4"
    )
    span_exporter.clear()
    caplog.clear()
    await publisher_stub.PublishJob(
        publish_request(job, postiz_profile), metadata=postiz_profile.metadata
    )
    trace_id = format_trace_id(
        _one(span_exporter.get_finished_spans(), PUBLISH_JOB, SpanKind.SERVER).context.trace_id
    )
    access = [r for r in caplog.records if getattr(r, "method", None) in (GET_JOB, PUBLISH_JOB)]
    assert len(access) == 3
    assert {record.trace_id for record in access} == {trace_id}


@pytest.fixture
async def otlp_collector() -> AsyncIterator[tuple[str, asyncio.Queue]]:
    """A gRPC OTLP trace collector on loopback; yields its endpoint and the requests it gets."""
    received: asyncio.Queue = asyncio.Queue()

    async def export(request, context):
        await received.put(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        export,
        request_deserializer=trace_service_pb2.ExportTraceServiceRequest.FromString,
        response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "opentelemetry.proto.collector.trace.v1.TraceService", {"Export": handler}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        await server.stop(0)


async def test_service_process_exports_spans_over_otlp_when_an_endpoint_is_set(
    database_url, otlp_collector
):
    endpoint, received = otlp_collector
    async with server_process(
        "jobs", database_url, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_BSP_SCHEDULE_DELAY="50"
    ) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await channel.unary_unary(GET_JOB)(b"", metadata=(("x-profile-id", "store-1"),))
        request = await asyncio.wait_for(received.get(), 30)
        await server.terminate()
    resource = request.resource_spans[0].resource
    spans = [span for scope in request.resource_spans[0].scope_spans for span in scope.spans]
    assert any(
        a.key == "service.name" and a.value.string_value == "jobs" for a in resource.attributes
    )
    assert GET_JOB in [span.name for span in spans]
