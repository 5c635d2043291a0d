"""The shared server and client interceptors, seen from a real client over loopback."""

import logging
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from services.runtime import errors
from services.runtime.call_context import profile_scope
from services.runtime.interceptors import ProfileInterceptor, profile_client_interceptors
from services.runtime.interceptors.handlers import InterceptorChain
from services.runtime.logs import LOG_FORMAT
from services.runtime.server import new_server
from services.runtime.settings import Settings
from tests.conftest import as_profile, new_profile_id

Code = grpc.StatusCode
MALFORMED_PROFILE_IDS = ["", "-starts-with-dash", "has space", "x" * 65, "semi;colon", "dot.ted"]


async def _status_of_get(stub, metadata) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetJob(jobs_pb2.GetJobRequest(job_id=str(uuid.uuid4())), metadata=metadata)
    return raised.value


async def _status_of_watch(stub, metadata) -> grpc.aio.AioRpcError:
    call = stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=str(uuid.uuid4())), metadata=metadata)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pass
    return raised.value


@pytest.mark.parametrize("call", [_status_of_get, _status_of_watch], ids=["unary", "streaming"])
async def test_call_without_profile_is_unauthenticated(jobs_stub, call):
    error = await call(jobs_stub, ())
    assert error.code() == Code.UNAUTHENTICATED
    assert error.details() == "x-profile-id metadata is required"


@pytest.mark.parametrize("call", [_status_of_get, _status_of_watch], ids=["unary", "streaming"])
@pytest.mark.parametrize("profile_id", MALFORMED_PROFILE_IDS)
async def test_malformed_profile_is_invalid_and_names_the_rule(jobs_stub, call, profile_id):
    error = await call(jobs_stub, as_profile(profile_id))
    assert error.code() == Code.INVALID_ARGUMENT
    assert "1 to 64 characters" in error.details()


@pytest.mark.parametrize("profile_id", ["a", "0", "Store_1-x", "x" * 64, str(uuid.uuid4())])
async def test_valid_profile_ids_are_accepted(jobs_stub, profile_id):
    error = await _status_of_get(jobs_stub, as_profile(profile_id))
    assert error.code() == Code.NOT_FOUND


async def test_health_needs_no_profile(jobs_channel):
    reply = await health_pb2_grpc.HealthStub(jobs_channel).Check(
        health_pb2.HealthCheckRequest(service="jobs.v1.JobService")
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_needs_no_profile(jobs_channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(jobs_channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for reply in stub.ServerReflectionInfo(iter([request])):
        names = {service.name for service in reply.list_services_response.service}
        assert "jobs.v1.JobService" in names
        break


def _formatted(records: list[logging.LogRecord]) -> list[str]:
    formatter = logging.Formatter(LOG_FORMAT)
    return [formatter.format(record) for record in records]


async def test_log_lines_during_a_call_carry_the_profile_prefix(jobs_stub, caplog):
    profile_id = new_profile_id()
    caplog.set_level(logging.INFO)
    logging.getLogger("test").info("outside any call")
    await _status_of_get(jobs_stub, as_profile(profile_id))
    lines = _formatted(caplog.records)
    access = [line for line in lines if "/jobs.v1.JobService/GetJob NOT_FOUND" in line]
    assert len(access) == 1
    assert f"[Profile {profile_id}] /jobs.v1.JobService/GetJob NOT_FOUND" in access[0]
    assert access[0].endswith("ms")
    outside = [line for line in lines if "outside any call" in line]
    assert "[Profile" not in outside[0]


async def test_rejected_call_is_logged_without_a_profile(jobs_stub, caplog):
    caplog.set_level(logging.INFO)
    await _status_of_get(jobs_stub, ())
    lines = [line for line in _formatted(caplog.records) if "UNAUTHENTICATED" in line]
    assert lines
    assert "[Profile" not in lines[0]


async def test_access_log_holds_no_message_body(jobs_stub, caplog):
    caplog.set_level(logging.DEBUG)
    profile = as_profile(new_profile_id())
    secret = "body-marker-8c1f"
    request = jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="render", message=secret))
    request.job.data.update({"api_key": secret})
    await jobs_stub.CreateJob(request, metadata=profile)
    assert all(secret not in line for line in _formatted(caplog.records))


async def test_client_interceptor_sends_the_current_profile(jobs_service):
    profile_id = new_profile_id()
    target = f"127.0.0.1:{jobs_service.port}"
    interceptors = profile_client_interceptors()
    async with grpc.aio.insecure_channel(target, interceptors=interceptors) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        with profile_scope(profile_id):
            job = await stub.CreateJob(jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k")))
    assert job.profile_id == profile_id


async def test_client_interceptor_passes_on_the_remaining_deadline(jobs_service):
    profile_id = new_profile_id()
    target = f"127.0.0.1:{jobs_service.port}"
    async with grpc.aio.insecure_channel(
        target, interceptors=profile_client_interceptors()
    ) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        with profile_scope(profile_id, time_remaining=30):
            job = await stub.CreateJob(jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k")))
        with profile_scope(profile_id, time_remaining=0.3):
            call = stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id))
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in call:
                    pass
    assert raised.value.code() == Code.DEADLINE_EXCEEDED


async def _serve(behavior, interceptor: ProfileInterceptor | None = None):
    """A server of one unary method, test.Service/Call, behind the shared interceptor,
    registered as the services register theirs."""
    server, handlers = new_server(InterceptorChain(interceptor or ProfileInterceptor()))
    handlers.add_registered_method_handlers(
        "test.Service", {"Call": grpc.unary_unary_rpc_method_handler(behavior)}
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _serve_raising(error: BaseException):
    """A server whose one handler raises `error`."""

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise error

    return await _serve(handler)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.NotFound("job x not found"), Code.NOT_FOUND),
        (errors.Conflict("etag mismatch"), Code.ABORTED),
        (errors.FailedPrecondition("job is done"), Code.FAILED_PRECONDITION),
        (errors.ResourceExhausted("slow down"), Code.RESOURCE_EXHAUSTED),
        (errors.Unavailable("database down"), Code.UNAVAILABLE),
        (errors.DeadlineExceeded("deadline passed"), Code.DEADLINE_EXCEEDED),
        (errors.PermissionDenied("not yours"), Code.PERMISSION_DENIED),
    ],
)
async def test_domain_errors_become_their_status_codes(error, code):
    server, port = await _serve_raising(error)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await channel.unary_unary("/test.Service/Call")(b"", metadata=as_profile("p"))
    finally:
        await server.stop(None)
    assert raised.value.code() == code
    assert raised.value.details() == str(error)


async def test_unexpected_exception_is_internal_and_logged_without_details(caplog):
    server, port = await _serve_raising(RuntimeError("secret internals"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await channel.unary_unary("/test.Service/Call")(b"", metadata=as_profile("p"))
    finally:
        await server.stop(None)
    assert raised.value.code() == Code.INTERNAL
    assert "secret internals" not in raised.value.details()
    assert any(record.exc_info for record in caplog.records if "failed" in record.message)


async def test_message_above_the_size_limit_is_refused(jobs_stub, profile):
    request = jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k", message="x" * 5_000_000))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await jobs_stub.CreateJob(request, metadata=profile)
    assert raised.value.code() == Code.RESOURCE_EXHAUSTED


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"fail":
        raise errors.NotFound("nothing here")
    return request


@pytest.mark.parametrize(
    ("access_log", "slow_call_seconds", "body", "logged"),
    [
        ("failures", 60.0, b"ok", False),
        ("failures", 60.0, b"fail", True),
        ("failures", 0.0, b"ok", True),  # slower than the threshold
        ("all", 60.0, b"ok", True),
    ],
    ids=["ok", "failed", "slow", "all"],
)
async def test_access_log_policy(caplog, access_log, slow_call_seconds, body, logged):
    caplog.set_level(logging.INFO)
    interceptor = ProfileInterceptor(access_log=access_log, slow_call_seconds=slow_call_seconds)
    server, port = await _serve(_echo, interceptor)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/test.Service/Call")
            if body == b"fail":
                with pytest.raises(grpc.aio.AioRpcError):
                    await call(body, metadata=as_profile("p1"))
            else:
                assert await call(body, metadata=as_profile("p1")) == body
    finally:
        await server.stop(None)
    access = [r for r in caplog.records if r.name == "services.access"]
    assert len(access) == (1 if logged else 0)
    if logged:
        assert access[0].method == "/test.Service/Call"
        assert access[0].status == ("NOT_FOUND" if body == b"fail" else "OK")


async def test_unknown_access_log_mode_is_refused():
    with pytest.raises(ValueError, match="all, failures"):
        ProfileInterceptor(access_log="some")


def test_access_log_setting_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://x")
    monkeypatch.delenv("ACCESS_LOG", raising=False)
    assert Settings.from_environment(50051).access_log == "failures"
    monkeypatch.setenv("ACCESS_LOG", " ALL ")
    assert Settings.from_environment(50051).access_log == "all"
    monkeypatch.setenv("ACCESS_LOG", "verbose")
    with pytest.raises(SystemExit, match="ACCESS_LOG must be one of all, failures"):
        Settings.from_environment(50051)


async def test_handlers_found_at_call_time_are_intercepted_too():
    """Handlers registered only as generic handlers (looked up per call) get the same
    profile check as those registered by name; an unknown method is UNIMPLEMENTED."""
    server, handlers = new_server(InterceptorChain(ProfileInterceptor()))
    handlers.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Generic", {"Call": grpc.unary_unary_rpc_method_handler(_echo)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/test.Generic/Call")
            assert await call(b"hi", metadata=as_profile("p1")) == b"hi"
            assert await call(b"again", metadata=as_profile("p1")) == b"again"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(b"hi")
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await channel.unary_unary("/test.Generic/Other")(b"", metadata=as_profile("p1"))
    finally:
        await server.stop(None)
    assert refused.value.code() == Code.UNAUTHENTICATED
    assert unknown.value.code() == Code.UNIMPLEMENTED


@pytest.mark.parametrize("profile_id", MALFORMED_PROFILE_IDS)
def test_profile_scope_refuses_a_malformed_profile(profile_id):
    refused = pytest.raises(errors.InvalidArgument, match="1 to 64 characters")
    with refused, profile_scope(profile_id):
        pass
