"""The server interceptor every service runs: who is calling, for which profile; metrics and
logging.

For each RPC it reads and validates `x-profile-id`, authorizes the caller, scopes the call to
that profile, holds it to the profile's fair share of the replica (runtime.shares:
calls in flight, and response streams open, per profile), decodes the request and encodes the
reply in the profile's turn at the CPU (runtime.turns), turns domain errors into gRPC status
codes (a retry delay as google.rpc.RetryInfo in the status details), counts and times the call for
Prometheus (runtime.interceptors.metrics) and writes an access line: for every
call with ACCESS_LOG=all, otherwise (the default) for each call that fails and each unary
call slower than SLOW_CALL_SECONDS. Every call is counted by method and status code in the
gRPC metrics either way; an access line for every call costs more CPU than all the rest of
the interceptor (`make bench`: the no-op rows with and without ACCESS_LOG=all). Health and
reflection are exempt so that probes and `grpcurl list` need no profile. The service's
cross-profile calls take no profile: its reads only an operator may call, and an operator
nothing else; its work queue (LeaseJobs) only a pipeline worker, which may then call, for a
job's profile, only the methods it acts on the jobs it holds with (UpdateJob, with the lease
the database checks). A profile's lifecycle (ExportProfile, DeleteProfile) is for operators
only, for the profile its x-profile-id names, each call logged with who made it.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc.aio import ServicerContext
from grpc_status import rpc_status

from services.runtime import errors
from services.runtime.byte_rates import ProfileByteRates
from services.runtime.call_context import (
    Caller,
    CallScope,
    current_caller,
    current_profile_id,
    profile_id_from_metadata,
    remaining_seconds,
)
from services.runtime.call_rates import ProfileCallRates
from services.runtime.interceptors.handlers import WrappingInterceptor
from services.runtime.interceptors.metrics import MethodMetrics, counted
from services.runtime.shares import CROSS_PROFILE_KEY, ProfileShares
from services.runtime.turns import ProfileTurns

access_log = logging.getLogger("services.access")
operator_log = logging.getLogger("services.operator")
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
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}

# (profile_id, context, method) → the proved caller, or None when nobody needs proving.
# profile_id is None for a cross-profile read. Raises Unauthenticated or PermissionDenied.
# Synchronous: it runs on every call, and a proof is checked from what the call carries.
Authorizer = Callable[[str | None, ServicerContext, str], Caller | None]

ACCESS_LOG_ALL = "all"
ACCESS_LOG_FAILURES = "failures"
ACCESS_LOG_MODES = (ACCESS_LOG_ALL, ACCESS_LOG_FAILURES)
SLOW_CALL_SECONDS = 1.0


class RefusalLines:
    """At most one access line a second for each profile's calls to a method refused past a
    fair share (RESOURCE_EXHAUSTED). A profile flooding a replica past its limits would
    otherwise have a line written, and the CPU to write it spent, for every refusal, in a log
    every profile shares. Every call is still counted in the metrics, and the next line says
    how many refusals went unwritten before it."""

    __slots__ = ("_prune_at", "_seconds", "_seen")

    def __init__(self, seconds: float = 1.0) -> None:
        self._seconds = seconds
        # (profile, method) → [when its last line was written, refusals unwritten since]
        self._seen: dict[tuple[str, str], list] = {}
        self._prune_at = _REFUSALS_PRUNE_AT_LEAST

    def admit(self, key: tuple[str, str]) -> int | None:
        """None: no line for this refusal; otherwise how many went unwritten before it."""
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self._seconds:
            seen[1] += 1
            return None
        self._seen[key] = [now, 0]
        if len(self._seen) >= self._prune_at:
            self._forget_quiet(now)
        return 0 if seen is None else seen[1]

    def _forget_quiet(self, now: float) -> None:
        """Drops keys whose last line is older than the window (their unwritten count too:
        the metrics hold it)."""
        for key in [k for k, seen in self._seen.items() if now - seen[0] >= self._seconds]:
            del self._seen[key]
        self._prune_at = max(_REFUSALS_PRUNE_AT_LEAST, 2 * len(self._seen))


_REFUSALS_PRUNE_AT_LEAST = 1024
REFUSAL_LINES = RefusalLines()


ANONYMOUS_CROSS_PROFILE = Caller(subject="anonymous (AUTH_MODE=none)", operator=True, worker=True)


def allow_any_caller(
    profile_id: str | None, context: ServicerContext, method: str
) -> Caller | None:
    """Trusts `x-profile-id` as sent, and lets anyone read or lease across profiles
    (AUTH_MODE=none: local debugging with grpcurl, where any profile can be named anyway)."""
    return ANONYMOUS_CROSS_PROFILE if profile_id is None else None


TrailingMetadata = tuple[tuple[str, str | bytes], ...]


def status_code_for(error: errors.DomainError) -> grpc.StatusCode:
    for error_type in type(error).__mro__:
        if error_type in STATUS_CODES:
            return STATUS_CODES[error_type]
    return grpc.StatusCode.INTERNAL


def status_for(error: errors.DomainError) -> tuple[grpc.StatusCode, str, TrailingMetadata]:
    """The code, message and trailing metadata a domain error ends its call with. A retry
    delay travels the standard way: a google.rpc.RetryInfo in the google.rpc.Status of
    `grpc-status-details-bin`, which gRPC clients (suite_client) and grpcurl decode."""
    code, message = status_code_for(error), str(error)
    if error.retry_after_seconds is None:
        return code, message, ()
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromNanoseconds(round(max(error.retry_after_seconds, 0.0) * 1e9))
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(retry)
    return code, message, rpc_status.to_status(status).trailing_metadata


class ProfileInterceptor(WrappingInterceptor):
    """Runs before every handler of every service.

    `authorize` is the one place where the proof that the caller may act for the profile
    (signed tokens, an operator scope) is checked; it raises Unauthenticated or
    PermissionDenied. Handlers never see a call it refused.

    `calls` limits each profile's calls in flight; `streams` its calls with a response stream
    (WatchJob), which stay open for as long as the caller likes while costing little, so they
    neither use up the profile's calls nor escape a limit of their own. Cross-profile reads
    count under one key of their own. No limit by default.
    """

    def __init__(
        self,
        authorize: Authorizer = allow_any_caller,
        cross_profile_methods: frozenset[str] = frozenset(),
        access_log: str = ACCESS_LOG_FAILURES,
        slow_call_seconds: float = SLOW_CALL_SECONDS,
        calls: ProfileShares | None = None,
        worker_methods: frozenset[str] = frozenset(),
        streams: ProfileShares | None = None,
        byte_rates: ProfileByteRates | None = None,
        call_rates: ProfileCallRates | None = None,
        operator_methods: frozenset[str] = frozenset(),
    ) -> None:
        if access_log not in ACCESS_LOG_MODES:
            raise ValueError(f"access_log must be one of {', '.join(ACCESS_LOG_MODES)}")
        self._authorize = authorize
        self._cross_profile_methods = cross_profile_methods
        self._worker_methods = worker_methods
        self._operator_methods = operator_methods
        self._log_every_call = access_log == ACCESS_LOG_ALL
        self._slow_call_seconds = slow_call_seconds
        self.calls = calls or ProfileShares(0)
        self.streams = streams or ProfileShares(0, what="streams open")
        self.byte_rates = byte_rates or ProfileByteRates(0, 0, 0)
        self.call_rates = call_rates or ProfileCallRates(0, 0, 0)
        self.turns = ProfileTurns()

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if method.startswith(EXEMPT_SERVICE_PREFIXES):
            return counted(method, handler)
        pipeline = _CallPipeline(
            method,
            MethodMetrics(method, handler),
            self._authorize,
            method in self._cross_profile_methods,
            # A stream's length is the caller's to choose: only its failure is news.
            self._log_every_call,
            None if handler.response_streaming else self._slow_call_seconds,
            self.streams if handler.response_streaming else self.calls,
            for_workers=method in self._worker_methods,
            for_operators=method in self._operator_methods,
        )
        return _wrap_handler(handler, pipeline, self.turns, self.byte_rates, self.call_rates)


class _CallPipeline:
    """What happens around one method's handler on every call, in one wrapper: each layer of
    wrapping costs a coroutine per call."""

    __slots__ = (
        "_authorize",
        "_log_every_call",
        "_slow_seconds",
        "cross_profile",
        "for_operators",
        "for_workers",
        "method",
        "metrics",
        "shares",
    )

    def __init__(
        self,
        method: str,
        metrics: MethodMetrics,
        authorize: Authorizer,
        cross_profile: bool = False,
        log_every_call: bool = True,
        slow_seconds: float | None = None,
        shares: ProfileShares | None = None,
        for_workers: bool = False,
        for_operators: bool = False,
    ) -> None:
        self.method = method
        self.for_workers = for_workers
        self.for_operators = for_operators
        self.metrics = metrics
        self._authorize = authorize
        self.cross_profile = cross_profile
        self._log_every_call = log_every_call
        self._slow_seconds = slow_seconds
        self.shares = shares or ProfileShares(0)

    def enter(self, context: ServicerContext) -> tuple[CallScope, str]:
        """The call's scope, and the key its share is counted under; a DomainError when the
        caller is refused."""
        profile_id = (
            None if self.cross_profile else profile_id_from_metadata(context.invocation_metadata())
        )
        caller = self._authorize(profile_id, context, self.method)
        self._check_scope(caller)
        if profile_id is not None:
            if self.for_operators:
                who = ANONYMOUS_CROSS_PROFILE.subject if caller is None else caller.subject
                operator_log.info(
                    "operator %s calls %s for profile %s", who, self.method, profile_id
                )
            return CallScope(profile_id, context.time_remaining(), caller), profile_id
        assert caller is not None  # _check_scope refuses a cross-profile call without one
        scope = CallScope(None, context.time_remaining(), caller)
        if self.for_workers:  # each worker leases within a share of its own
            return scope, f"(worker {caller.subject})"
        operator_log.info("operator %s calls %s", caller.subject, self.method)
        return scope, CROSS_PROFILE_KEY

    async def take_share(self, share: str) -> None:
        """Waits for a slot of the profile's share (the queue time at most, and never past
        the call's deadline); ResourceExhausted when none comes. Only for a call that
        `shares.try_enter` refused."""
        await self.shares.enter_when_free(share, remaining_seconds())

    def refuse(self, context: ServicerContext, error: errors.DomainError, started: float) -> None:
        """Ends a call the caller may not make (logged); its handler returns at once."""
        self.end(context, *status_for(error), started)

    def _check_scope(self, caller: Caller | None) -> None:
        """Operator scope is for the cross-profile reads and a profile's lifecycle, and only
        for them; worker scope for the work queue's methods, and only for them. With nobody to
        prove (AUTH_MODE=none) anyone may call either."""
        operator = caller is not None and caller.operator
        worker = caller is not None and caller.worker
        if self.for_operators:
            if caller is not None and not operator:
                raise errors.PermissionDenied(
                    f"{self.method} acts on a profile's whole data: it needs a token with "
                    "scope operator"
                )
            return
        if self.cross_profile:
            if self.for_workers and not worker:
                raise errors.PermissionDenied(
                    f"{self.method} leases jobs of every profile: it needs a token with scope "
                    "worker"
                )
            if not self.for_workers and not operator:
                raise errors.PermissionDenied(
                    f"{self.method} reads across profiles: it needs a token with scope operator"
                )
            return
        if worker and self.for_workers:
            return
        if operator or worker:
            raise errors.PermissionDenied(
                f"a token with scope {'worker' if worker else 'operator'} may not call "
                f"{self.method}: "
                + (
                    "a worker leases jobs (LeaseJobs) and updates the jobs it holds"
                    if worker
                    else "an operator token may call only the cross-profile reads and a "
                    "profile's ExportProfile and DeleteProfile"
                )
            )

    def outcome(
        self, context: ServicerContext, error: BaseException
    ) -> tuple[grpc.StatusCode, str | None, TrailingMetadata]:
        """The status a failed call ends with, and the message and trailing metadata to end
        it with where the error is one this pipeline answers (None: let gRPC finish the call
        as it is)."""
        if isinstance(error, grpc.aio.AbortError):
            return context.code() or grpc.StatusCode.UNKNOWN, None, ()
        if isinstance(error, asyncio.CancelledError | GeneratorExit):
            return grpc.StatusCode.CANCELLED, None, ()
        if isinstance(error, errors.DomainError):
            return status_for(error)
        if isinstance(error, Exception):
            log.error("%s failed", self.method, exc_info=error)
            return grpc.StatusCode.INTERNAL, "internal error; see the server log", ()
        return grpc.StatusCode.UNKNOWN, None, ()

    def end(
        self,
        context: ServicerContext,
        code: grpc.StatusCode,
        message: str,
        trailing_metadata: TrailingMetadata,
        started: float,
    ) -> None:
        """Records the call and sets the status gRPC sends once the handler returns, which it
        must do next. No exception leaves the handler, as `context.abort` would raise: a
        refusal then costs no more than a reply, where with tracing on OpenTelemetry formats
        an escaping exception's traceback twice (milliseconds of the replica's CPU)."""
        self.finish(code, started)
        context.set_code(code)
        context.set_details(message)
        if trailing_metadata:
            context.set_trailing_metadata(trailing_metadata)

    def finish(self, code: grpc.StatusCode, started: float) -> None:
        """Counts and times the call; writes its access line if the policy wants one:
        method, status, duration and the proved caller, never a body."""
        elapsed = time.perf_counter() - started
        self.metrics.finish(code, elapsed)
        if (
            code is grpc.StatusCode.OK
            and not self._log_every_call
            and (self._slow_seconds is None or elapsed < self._slow_seconds)
        ):
            return
        unwritten = 0
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            admitted = REFUSAL_LINES.admit((current_profile_id() or "", self.method))
            if admitted is None:
                return
            unwritten = admitted
        elapsed_ms = elapsed * 1000
        caller = current_caller()
        fields = {"method": self.method, "status": code.name, "duration_ms": round(elapsed_ms, 2)}
        line, arguments = "%s %s %.1fms", [self.method, code.name, elapsed_ms]
        if caller is not None:
            line += " caller=%s"
            arguments.append(caller.subject)
            fields["caller"] = caller.subject
        if unwritten:
            line += " (%d more refused since the last line)"
            arguments.append(unwritten)
            fields["refused_unwritten"] = unwritten
        access_log.info(line, *arguments, extra=fields)


def _wrap_handler(
    handler: grpc.RpcMethodHandler,
    call: _CallPipeline,
    turns: ProfileTurns,
    rates: ProfileByteRates,
    call_rates: ProfileCallRates,
) -> grpc.RpcMethodHandler:
    """The same handler run inside the call pipeline; the call type is kept. A call past its
    profile's call rate (runtime.call_rates) is refused before its request is decoded. The
    request is decoded and the reply encoded here, in the profile's turn (runtime.turns), not
    by gRPC before and after: a large message costs its own profile's turn, not everyone's.
    Each message's bytes are charged to the profile's byte rate (runtime.byte_rates)."""
    shares = call.shares
    deserialize = handler.request_deserializer
    if handler.response_streaming:
        inner_stream = handler.unary_stream or handler.stream_stream
        encode = _LastReplyEncoder(handler.response_serializer)

        async def streaming(request_or_iterator: Any, context: ServicerContext) -> Any:
            started = call.metrics.start()
            try:
                scope, share = call.enter(context)
            except errors.DomainError as error:
                call.refuse(context, error, started)
                return
            code, logged = grpc.StatusCode.OK, False
            turn, turn_token = turns.enter(share)
            entered = False
            try:
                if wait := call_rates.reserve(share, context.time_remaining()):
                    await asyncio.sleep(wait)
                entered = shares.try_enter(share)
                if not entered:
                    await call.take_share(share)
                    entered = True
                requests = await _decoded(
                    request_or_iterator, handler.request_streaming, deserialize, turn, rates, share
                )
                async for response in inner_stream(requests, context):
                    async with turn:
                        reply = encode(response)
                    rates.charge(share, len(reply))
                    yield reply
                code = context.code() or code
            except BaseException as error:
                code, message, trailing = call.outcome(context, error)
                if message is None:
                    raise
                logged = True
                call.end(context, code, message, trailing, started)
            finally:
                if entered:
                    shares.leave(share)
                turns.leave(share, turn_token)
                if not logged:
                    call.finish(code, started)
                scope.close()

        behavior: Any = streaming
        factory = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )
    else:
        inner_unary = handler.unary_unary or handler.stream_unary
        serialize = handler.response_serializer

        async def unary(request_or_iterator: Any, context: ServicerContext) -> Any:
            started = call.metrics.start()
            try:
                scope, share = call.enter(context)
            except errors.DomainError as error:
                call.refuse(context, error, started)
                return
            code, logged = grpc.StatusCode.OK, False
            turn, turn_token = turns.enter(share)
            entered = False
            try:
                if wait := call_rates.reserve(share, context.time_remaining()):
                    await asyncio.sleep(wait)
                entered = shares.try_enter(share)
                if not entered:
                    await call.take_share(share)
                    entered = True
                requests = await _decoded(
                    request_or_iterator, handler.request_streaming, deserialize, turn, rates, share
                )
                response = await inner_unary(requests, context)
                code = context.code() or code
                if serialize is not None and not isinstance(response, bytes):
                    async with turn:
                        response = serialize(response)
                # Not a reply its servicer encoded (paging.encoded_page): encoded here.
                rates.charge(share, len(response) if isinstance(response, bytes) else 0)
                return response
            except BaseException as error:
                code, message, trailing = call.outcome(context, error)
                if message is None:
                    raise
                logged = True
                call.end(context, code, message, trailing, started)
            finally:
                if entered:
                    shares.leave(share)
                turns.leave(share, turn_token)
                if not logged:
                    call.finish(code, started)
                scope.close()

        behavior = unary
        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
    # No serializers: gRPC hands over the request's bytes and sends the reply's as they are.
    return factory(behavior)


class _LastReplyEncoder:
    """A response stream's replies encoded, the last one's bytes kept: one reply sent to many
    streams (each change WatchJob sends to every watcher of a job) is encoded once. A reply is
    never changed once yielded, so the same object means the same bytes."""

    __slots__ = ("_last", "_last_bytes", "_serialize")

    def __init__(self, serialize: Callable[[Any], bytes] | None) -> None:
        self._serialize = serialize
        self._last: Any = None
        self._last_bytes = b""

    def __call__(self, response: Any) -> Any:
        if self._serialize is None:
            return response
        if response is not self._last:
            self._last_bytes = self._serialize(response)
            self._last = response
        return self._last_bytes


def _decode(deserialize: Callable[[bytes], Any] | None, data: Any) -> Any:
    """The request message from its bytes. gRPC would answer UNKNOWN for a message protobuf
    refuses to parse (for example nested deeper than it allows); the caller is told
    INVALID_ARGUMENT, and the refusal logged like any other."""
    if deserialize is None:
        return data
    try:
        return deserialize(data)
    except DecodeError as error:
        raise errors.InvalidArgument(f"the request message cannot be parsed: {error}") from None


async def _decoded_stream(
    requests: Any,
    deserialize: Callable[[bytes], Any] | None,
    turn: Any,
    rates: ProfileByteRates,
    share: str,
) -> Any:
    async for data in requests:
        # A stream's messages wait their turn at the profile's rate: the stream slows down.
        if rates.wait_seconds(share):
            await rates.admit(share, remaining_seconds(), refuse=False)
        rates.charge(share, len(data) if isinstance(data, bytes) else 0)
        async with turn:
            request = _decode(deserialize, data)
        yield request


async def _decoded(
    request_or_iterator: Any,
    request_streaming: bool,
    deserialize: Callable[[bytes], Any] | None,
    turn: Any,
    rates: ProfileByteRates,
    share: str,
) -> Any:
    """The request, or the requests one by one, decoded in the profile's turn once the
    profile's byte rate lets them through."""
    if request_streaming:
        return _decoded_stream(request_or_iterator, deserialize, turn, rates, share)
    if rates.wait_seconds(share):
        await rates.admit(share, remaining_seconds(), refuse=True)
    rates.charge(share, len(request_or_iterator) if isinstance(request_or_iterator, bytes) else 0)
    async with turn:
        return _decode(deserialize, request_or_iterator)
