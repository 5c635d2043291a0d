"""Requests and checks shared by the Publisher tests."""

import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import timestamp_pb2
from publisher.v1 import publisher_pb2

from tests.conftest import PostizProfile


async def expect_status(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code, raised.value.details()
    return raised.value.details()


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def post_request(
    profile: PostizProfile,
    content: str = "A new video is out",
    request_id: str | None = None,
    publish_time: datetime | None = None,
) -> publisher_pb2.CreatePostRequest:
    """Schedules `content` on the profile's first channel."""
    when = publish_time or datetime.now(UTC) + timedelta(hours=1)
    return publisher_pb2.CreatePostRequest(
        request_id=request_id or str(uuid.uuid4()),
        type=publisher_pb2.POST_TYPE_SCHEDULE,
        publish_time=timestamp(when),
        posts=[
            publisher_pb2.IntegrationPost(
                integration_id=profile.organization.integrations[0]["id"],
                values=[publisher_pb2.PostValue(content=content)],
            )
        ],
    )


def around_now(hours: int = 3) -> tuple[timestamp_pb2.Timestamp, timestamp_pb2.Timestamp]:
    now = datetime.now(UTC)
    return timestamp(now - timedelta(hours=hours)), timestamp(now + timedelta(hours=hours))
