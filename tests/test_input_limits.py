"""The limits on free-form input, each refused with an INVALID_ARGUMENT that names it."""

import math
from datetime import UTC

import grpc
import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st
from jobs.v1 import jobs_pb2
from publisher.v1 import publisher_pb2

from services.runtime.fields import (
    MAX_STRUCT_DEPTH,
    struct_dict,
    struct_message,
    timestamp_datetime,
    timestamp_message,
)

Code = grpc.StatusCode


def _nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


def _create(data: dict | struct_pb2.Struct) -> jobs_pb2.CreateJobRequest:
    request = jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k"))
    if isinstance(data, struct_pb2.Struct):
        request.job.data.CopyFrom(data)
    else:
        request.job.data.update(data)
    return request


async def _refusal(call) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == Code.INVALID_ARGUMENT, raised.value.details()
    return raised.value.details()


async def test_struct_at_the_depth_limit_is_accepted(jobs_stub, profile):
    job = await jobs_stub.CreateJob(_create(_nested(MAX_STRUCT_DEPTH)), metadata=profile)
    assert job.data["n"]


async def test_struct_deeper_than_the_limit_is_refused(jobs_stub, profile):
    details = await _refusal(
        jobs_stub.CreateJob(_create(_nested(MAX_STRUCT_DEPTH + 1)), metadata=profile)
    )
    assert f"job.data is nested deeper than {MAX_STRUCT_DEPTH} levels" == details


async def test_message_deeper_than_protobuf_parses_is_refused_not_unknown(jobs_stub, profile):
    details = await _refusal(jobs_stub.CreateJob(_create(_nested(200)), metadata=profile))
    assert "cannot be parsed" in details


async def test_struct_larger_than_the_limit_is_refused(jobs_stub, profile):
    details = await _refusal(
        jobs_stub.CreateJob(_create({"big": "x" * 1_000_001}), metadata=profile)
    )
    assert "larger than 1000000 bytes" in details


@pytest.mark.parametrize(
    ("value", "rule"),
    [(math.nan, "NaN"), (math.inf, "NaN or infinite"), ("a\x00b", "NUL")],
    ids=["nan", "infinity", "nul"],
)
async def test_struct_value_postgres_cannot_hold_is_refused(jobs_stub, profile, value, rule):
    details = await _refusal(jobs_stub.CreateJob(_create({"v": value}), metadata=profile))
    assert rule in details


async def test_struct_key_with_nul_is_refused(jobs_stub, profile):
    await _refusal(jobs_stub.CreateJob(_create({"a\x00": 1}), metadata=profile))


@pytest.mark.parametrize("seconds", [-(2**62), 253_402_300_800], ids=["before_1", "after_9999"])
async def test_time_outside_the_timestamp_range_is_refused(jobs_stub, profile, seconds):
    request = jobs_pb2.ListJobsRequest(create_time_start=timestamp_pb2.Timestamp(seconds=seconds))
    details = await _refusal(jobs_stub.ListJobs(request, metadata=profile))
    assert details == "create_time_start must be a time between years 1 and 9999"


async def test_negative_page_size_is_refused(jobs_stub, profile):
    await _refusal(jobs_stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=-1), metadata=profile))


async def test_string_longer_than_its_limit_is_refused(jobs_stub, profile):
    request = jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="k" * 101))
    details = await _refusal(jobs_stub.CreateJob(request, metadata=profile))
    assert "longer than 100 characters" in details


@pytest.mark.parametrize("api_key", ["k\u00e9y", "key\r\nX-Injected: 1"], ids=["non_ascii", "crlf"])
async def test_api_key_that_cannot_be_an_http_header_is_refused(publisher_stub, profile, api_key):
    request = publisher_pb2.SetPostizCredentialsRequest(
        base_url="https://api.postiz.com/public/v1", api_key=api_key
    )
    details = await _refusal(publisher_stub.SetPostizCredentials(request, metadata=profile))
    assert "printable ASCII" in details


@given(st.datetimes(timezones=st.just(UTC)))
def test_timestamp_message_is_exact_to_the_microsecond(value):
    """The reply-side conversion agrees with protobuf's own, before 1970 and up to 9999."""
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(value)
    assert timestamp_message(value) == expected
    assert timestamp_datetime(timestamp_message(value), "t") == value


@pytest.mark.parametrize("value", [{}, {"a": 1, "b": {"c": [True, None, "x"]}}])
def test_struct_message_holds_the_dict(value):
    assert json_format.MessageToDict(struct_message(value)) == value


_text = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)))
_json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(_text, _json_values, max_size=5))
def test_struct_dict_reads_a_struct_as_json_format_does(value):
    message = struct_pb2.Struct()
    message.update(value)
    assert struct_dict(message, "data") == json_format.MessageToDict(message)
