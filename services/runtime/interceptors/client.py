"""The client interceptors for service-to-service calls made while serving a call.

It attaches the current profile's `x-profile-id` and the caller's own `authorization` token,
and passes on what is left of the incoming call's deadline, so a downstream service acts for
the same profile, on the same caller's authority, and never works past the moment the
original caller gives up.
"""

from typing import Any

import grpc
from grpc.aio import ClientCallDetails

from services.runtime.call_context import (
    AUTHORIZATION_METADATA_KEY,
    PROFILE_METADATA_KEY,
    current_caller,
    current_profile_id,
    remaining_seconds,
)


def _with_call_context(details: ClientCallDetails) -> ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    profile_id = current_profile_id()
    if profile_id is not None and PROFILE_METADATA_KEY not in metadata:
        metadata.add(PROFILE_METADATA_KEY, profile_id)
    caller = current_caller()
    if caller is not None and caller.authorization and AUTHORIZATION_METADATA_KEY not in metadata:
        metadata.add(AUTHORIZATION_METADATA_KEY, caller.authorization)
    timeout = details.timeout
    remaining = remaining_seconds()
    if remaining is not None:
        remaining = max(remaining, 0.0)
        timeout = remaining if timeout is None else min(timeout, remaining)
    return ClientCallDetails(
        method=details.method,
        timeout=timeout,
        metadata=metadata,
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_call_context(details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_call_context(details), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_call_context(details), requests)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_call_context(details), requests)


def profile_client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for every call type, to pass as a channel's `interceptors`.

    One object per call type: grpc.aio files an interceptor under the first type it
    implements only.
    """
    return [_UnaryUnary(), _UnaryStream(), _StreamUnary(), _StreamStream()]
