"""The limits on free-form input, each refused with an INVALID_ARGUMENT that names it."""

import math
import uuid
from datetime import UTC

import grpc
import pytest
from costs.v1 import costs_pb2
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st
from jobs.v1 import jobs_pb2
from publisher.v1 import publisher_pb2

from services.costs.servicer import (
    MAX_ALERT_THRESHOLDS,
    MAX_ATTRIBUTES_VALUES,
    MAX_LINES_PER_MESSAGE,
)
from services.jobs.servicer import MAX_STATUSES
from services.publisher.servicer import (
    MAX_INTEGRATIONS,
    MAX_MEDIA,
    MAX_MEDIA_IN_ALL,
    MAX_SETTINGS_VALUES,
    MAX_TAGS,
    MAX_VALUES,
)
from services.runtime.fields import (
    MAX_STRUCT_DEPTH,
    MAX_STRUCT_VALUES,
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


async def _answer(call) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return Code.OK, ""


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


_text = st.text(
    st.characters(
        exclude_characters=[chr(c) for c in range(32) if chr(c) not in "\t\n\r"],
        exclude_categories=("Cs",),
    )
)
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


# Values: every value a Struct holds counts, containers included.


def _values(count: int) -> struct_pb2.Struct:
    """A Struct of exactly `count` values: one list and count - 1 empty lists in it."""
    message = struct_pb2.Struct()
    message.update({"l": [[] for _ in range(count - 1)]})
    return message


async def test_job_data_at_the_value_budget_is_accepted(jobs_stub, profile):
    job = await jobs_stub.CreateJob(_create(_values(MAX_STRUCT_VALUES)), metadata=profile)
    assert len(job.data["l"]) == MAX_STRUCT_VALUES - 1


async def test_job_data_with_more_values_than_the_budget_is_invalid_argument(jobs_stub, profile):
    details = await _refusal(
        jobs_stub.CreateJob(_create(_values(MAX_STRUCT_VALUES + 1)), metadata=profile)
    )
    assert details == f"job.data holds more than {MAX_STRUCT_VALUES} values"


async def test_job_data_of_a_quarter_million_empty_lists_under_1_mb_is_invalid_argument(
    jobs_stub, profile
):
    data = _values(240_000)
    assert data.ByteSize() < 1_000_000
    details = await _refusal(jobs_stub.CreateJob(_create(data), metadata=profile))
    assert details == f"job.data holds more than {MAX_STRUCT_VALUES} values"


async def test_job_result_with_more_values_than_the_budget_is_invalid_argument(jobs_stub, profile):
    job = await jobs_stub.CreateJob(_create({}), metadata=profile)
    request = jobs_pb2.UpdateJobRequest(job=jobs_pb2.Job(job_id=job.job_id))
    request.job.result.CopyFrom(_values(MAX_STRUCT_VALUES + 1))
    request.update_mask.paths.append("result")
    details = await _refusal(jobs_stub.UpdateJob(request, metadata=profile))
    assert details == f"job.result holds more than {MAX_STRUCT_VALUES} values"


async def test_usage_attributes_with_more_values_than_their_budget_are_invalid_argument(
    costs_stub, profile
):
    request = costs_pb2.RecordUsageRequest(
        request_id="r", provider="acme", model="m", unit="seconds", quantity="1"
    )
    request.attributes.CopyFrom(_values(MAX_ATTRIBUTES_VALUES + 1))
    details = await _refusal(costs_stub.RecordUsage(request, metadata=profile))
    assert details == f"attributes holds more than {MAX_ATTRIBUTES_VALUES} values"


def _post(**fields) -> publisher_pb2.CreatePostRequest:
    """A CreatePost request that passes validation unless `fields` break it; refused
    before Postiz or the profile's credentials are looked at."""
    post = publisher_pb2.IntegrationPost(
        integration_id="integration-1", values=[publisher_pb2.PostValue(content="Watch this")]
    )
    request = publisher_pb2.CreatePostRequest(
        request_id="post-1", type=publisher_pb2.POST_TYPE_NOW, posts=[post]
    )
    for name, value in fields.items():
        target = getattr(request, name)
        target.extend(value) if isinstance(value, list) else setattr(request, name, value)
    return request


def _post_of(**post) -> publisher_pb2.CreatePostRequest:
    """A CreatePost request of one post with these fields."""
    request = _post()
    del request.posts[:]
    request.posts.add(integration_id="integration-1", **post)
    return request


async def test_post_settings_with_more_values_than_their_budget_are_invalid_argument(
    publisher_stub, profile
):
    request = _post()
    request.posts[0].settings.CopyFrom(_values(MAX_SETTINGS_VALUES + 1))
    details = await _refusal(publisher_stub.CreatePost(request, metadata=profile))
    assert details == f"posts[0].settings holds more than {MAX_SETTINGS_VALUES} values"


# Repeated fields: each has a maximum count, checked before any entry is converted.


def _update_with_paths(count: int) -> jobs_pb2.UpdateJobRequest:
    request = jobs_pb2.UpdateJobRequest(job=jobs_pb2.Job(job_id=str(uuid.uuid4())))
    request.update_mask.paths.extend(["progress"] * count)
    return request


def _media(count: int) -> publisher_pb2.CreatePostRequest:
    request = _post()
    request.posts[0].values[0].media.extend(
        publisher_pb2.Media(id="m", path="https://x.test/m.png") for _ in range(count)
    )
    return request


def _values_of_post(count: int) -> publisher_pb2.CreatePostRequest:
    request = _post()
    request.posts[0].values.extend(
        publisher_pb2.PostValue(content="More") for _ in range(count - 1)
    )
    return request


def _publish_job(**fields) -> publisher_pb2.PublishJobRequest:
    request = publisher_pb2.PublishJobRequest(
        job_id=str(uuid.uuid4()), integration_ids=["integration-1"], content="Watch this"
    )
    for key in fields.get("settings", []):
        request.settings[key].update({"__type": "x"})
    if "integration_ids" in fields:
        request.integration_ids[:] = fields["integration_ids"]
    return request


# (service, rpc, field, its limit, a request with `count` entries in it)
_REPEATED = [
    ("jobs", "ListJobs", "statuses", MAX_STATUSES,
     lambda n: jobs_pb2.ListJobsRequest(statuses=[jobs_pb2.PENDING] * n)),
    ("jobs", "UpdateJob", "update_mask.paths", 6, _update_with_paths),
    ("costs", "GetCostSummary", "group_by", 7,
     lambda n: costs_pb2.GetCostSummaryRequest(
         start_time={"seconds": 0}, end_time={"seconds": 1}, group_by=[costs_pb2.MODEL] * n)),
    ("costs", "SetBudget", "alert_thresholds", MAX_ALERT_THRESHOLDS,
     lambda n: costs_pb2.SetBudgetRequest(
         period=costs_pb2.MONTHLY, limit_usd="10", alert_thresholds=range(1, n + 1))),
    ("costs", "StreamUsage", "lines", MAX_LINES_PER_MESSAGE,
     lambda n: [costs_pb2.StreamUsageRequest(lines=[costs_pb2.UsageLine()] * n)]),
    ("publisher", "CreatePost", "posts", MAX_INTEGRATIONS,
     lambda n: _post(posts=[_post().posts[0]] * (n - 1))),
    ("publisher", "CreatePost", "posts[0].values", MAX_VALUES, _values_of_post),
    ("publisher", "CreatePost", "posts[0].values[0].media", MAX_MEDIA, _media),
    ("publisher", "CreatePost", "tags", MAX_TAGS,
     lambda n: _post(tags=[publisher_pb2.Tag(value="t")] * n)),
    ("publisher", "PublishJob", "integration_ids", MAX_INTEGRATIONS,
     lambda n: _publish_job(integration_ids=[f"i-{k}" for k in range(n)])),
    ("publisher", "PublishJob", "settings", MAX_INTEGRATIONS,
     lambda n: _publish_job(settings=[f"i-{k}" for k in range(n)])),
]  # fmt: skip


@pytest.fixture
def stubs(jobs_stub, costs_stub, publisher_stub) -> dict:
    return {"jobs": jobs_stub, "costs": costs_stub, "publisher": publisher_stub}


def _call(stub, rpc: str, request, profile):
    if isinstance(request, list):  # a client stream
        return getattr(stub, rpc)(iter(request), metadata=profile)
    return getattr(stub, rpc)(request, metadata=profile)


@pytest.mark.parametrize(
    ("service", "rpc", "field", "limit", "request_of"),
    _REPEATED,
    ids=[f"{rpc}.{field}" for _, rpc, field, _, _ in _REPEATED],
)
async def test_repeated_field_over_its_maximum_count_is_invalid_argument(
    stubs, profile, service, rpc, field, limit, request_of
):
    details = await _refusal(_call(stubs[service], rpc, request_of(limit + 1), profile))
    assert f"{field} holds more than {limit} entries ({limit + 1})" in details


@pytest.mark.parametrize(
    ("service", "rpc", "field", "limit", "request_of"),
    _REPEATED,
    ids=[f"{rpc}.{field}" for _, rpc, field, _, _ in _REPEATED],
)
async def test_repeated_field_at_its_maximum_count_is_not_refused_for_its_count(
    stubs, profile, service, rpc, field, limit, request_of
):
    # It may be refused for something else: no such job, no Postiz credentials.
    code, details = await _answer(_call(stubs[service], rpc, request_of(limit), profile))
    assert code != Code.INTERNAL, details
    assert "entries" not in details, details


# Text: NUL nowhere; other control characters nowhere in names, only tab, line feed and
# carriage return in free text.


def _job_update(path: str, value: str) -> jobs_pb2.UpdateJobRequest:
    request = jobs_pb2.UpdateJobRequest(job=jobs_pb2.Job(job_id=str(uuid.uuid4())))
    setattr(request.job, path, value)
    request.update_mask.paths.append(path)
    return request


def _tts(**fields) -> costs_pb2.RecordElevenLabsTTSRequest:
    values = {"request_id": "r", "model_id": "eleven_flash_v2_5", "characters": 1} | fields
    return costs_pb2.RecordElevenLabsTTSRequest(**values)


def _usage(**fields) -> costs_pb2.RecordUsageRequest:
    values = {"request_id": "r", "provider": "acme", "model": "m", "unit": "s", "quantity": "1"}
    return costs_pb2.RecordUsageRequest(**(values | fields))


# (service, rpc, the field as the refusal names it, a request with `text` in that field)
_TEXT_FIELDS = [
    ("jobs", "CreateJob", "job.kind", lambda t: jobs_pb2.CreateJobRequest(
        job=jobs_pb2.Job(kind=f"k{t}"))),
    ("jobs", "CreateJob", "request_id", lambda t: jobs_pb2.CreateJobRequest(
        job=jobs_pb2.Job(kind="k"), request_id=t)),
    ("jobs", "UpdateJob", "job.message", lambda t: _job_update("message", t)),
    ("jobs", "UpdateJob", "job.error", lambda t: _job_update("error", t)),
    ("jobs", "UpdateJob", "job.etag", lambda t: jobs_pb2.UpdateJobRequest(
        job=jobs_pb2.Job(job_id=str(uuid.uuid4()), etag=t),
        update_mask={"paths": ["progress"]})),
    ("jobs", "ListJobs", "kind", lambda t: jobs_pb2.ListJobsRequest(kind=t)),
    ("costs", "RecordElevenLabsTTS", "model_id", lambda t: _tts(model_id=f"m{t}")),
    ("costs", "RecordElevenLabsTTS", "voice_id", lambda t: _tts(voice_id=t)),
    ("costs", "RecordElevenLabsTTS", "request_id", lambda t: _tts(request_id=f"r{t}")),
    ("costs", "RecordGeminiUsage", "model", lambda t: costs_pb2.RecordGeminiUsageRequest(
        request_id="r", model=f"m{t}")),
    ("costs", "RecordUsage", "provider", lambda t: _usage(provider=f"p{t}")),
    ("costs", "RecordUsage", "unit", lambda t: _usage(unit=f"u{t}")),
    ("costs", "RecordUsage", "attributes", lambda t: _usage(attributes={"note": t})),
    ("costs", "ListPrices", "provider", lambda t: costs_pb2.ListPricesRequest(provider=t)),
    ("costs", "ListCostEntries", "model", lambda t: costs_pb2.ListCostEntriesRequest(model=t)),
    ("publisher", "SetPostizCredentials", "base_url",
     lambda t: publisher_pb2.SetPostizCredentialsRequest(base_url=f"https://x{t}", api_key="k")),
    ("publisher", "CreatePost", "tags[0].value",
     lambda t: _post(tags=[publisher_pb2.Tag(value=f"t{t}")])),
    ("publisher", "CreatePost", "tags[0].label",
     lambda t: _post(tags=[publisher_pb2.Tag(value="t", label=t)])),
    ("publisher", "CreatePost", "request_id", lambda t: _post(request_id=f"r{t}")),
    ("publisher", "CreatePost", "job_id", lambda t: _post(job_id=t)),
    ("publisher", "CreatePost", "posts[0].values[0].content",
     lambda t: _post_of(values=[publisher_pb2.PostValue(content=f"c{t}")])),
    ("publisher", "CreatePost", "posts[0].settings",
     lambda t: _post_of(values=[publisher_pb2.PostValue(content="c")], settings={"title": t})),
    ("publisher", "GetPost", "post_id", lambda t: publisher_pb2.GetPostRequest(post_id=f"p{t}")),
    ("publisher", "DeletePost", "post_id",
     lambda t: publisher_pb2.DeletePostRequest(post_id=f"p{t}")),
    ("publisher", "UploadMediaFromUrl", "url",
     lambda t: publisher_pb2.UploadMediaFromUrlRequest(url=f"https://x.test/{t}")),
    ("publisher", "UploadMedia", "metadata.filename", lambda t: [publisher_pb2.UploadMediaRequest(
        metadata={"filename": f"a{t}.png", "content_type": "image/png", "size_bytes": 1})]),
    ("publisher", "PublishJob", "content", lambda t: publisher_pb2.PublishJobRequest(
        job_id="j", integration_ids=["i"], content=f"c{t}")),
]  # fmt: skip
_FREE_TEXT = {
    "job.message",
    "job.error",
    "attributes",
    "posts[0].values[0].content",
    "posts[0].settings",
    "content",
}


def _text_ids(cases: list) -> list[str]:
    return [f"{rpc}.{field}" for _, rpc, field, _ in cases]


@pytest.mark.parametrize(
    ("service", "rpc", "field", "request_of"), _TEXT_FIELDS, ids=_text_ids(_TEXT_FIELDS)
)
async def test_nul_in_any_string_is_invalid_argument_naming_the_field(
    stubs, profile, service, rpc, field, request_of
):
    details = await _refusal(_call(stubs[service], rpc, request_of("a\x00b"), profile))
    assert details.startswith(field)
    assert details.endswith("must not contain NUL characters")


@pytest.mark.parametrize(
    ("service", "rpc", "field", "request_of"), _TEXT_FIELDS, ids=_text_ids(_TEXT_FIELDS)
)
async def test_escape_character_in_any_string_is_invalid_argument_naming_the_field(
    stubs, profile, service, rpc, field, request_of
):
    details = await _refusal(_call(stubs[service], rpc, request_of("a\x1bb"), profile))
    assert details.startswith(field)
    assert "must not contain control characters" in details
    assert details.endswith("got U+001B")


_NAMES = [case for case in _TEXT_FIELDS if case[2] not in _FREE_TEXT]
_FREE = [case for case in _TEXT_FIELDS if case[2] in _FREE_TEXT]


@pytest.mark.parametrize(("service", "rpc", "field", "request_of"), _NAMES, ids=_text_ids(_NAMES))
async def test_line_break_in_a_name_is_invalid_argument(
    stubs, profile, service, rpc, field, request_of
):
    details = await _refusal(_call(stubs[service], rpc, request_of("a\nb"), profile))
    assert details.startswith(field)
    assert details.endswith("must not contain control characters, got U+000A")


@pytest.mark.parametrize(("service", "rpc", "field", "request_of"), _FREE, ids=_text_ids(_FREE))
async def test_tab_and_line_breaks_in_free_text_are_not_refused(
    stubs, profile, service, rpc, field, request_of
):
    # It may be refused for something else: no such job, no Postiz credentials.
    request = request_of("line 1\tx\r\nline 2")
    code, details = await _answer(_call(stubs[service], rpc, request, profile))
    assert code != Code.INTERNAL, details
    assert field not in details, details


async def test_job_message_keeps_tabs_and_line_breaks(jobs_stub, profile):
    job = await jobs_stub.CreateJob(_create({}), metadata=profile)
    request = _job_update("message", "line 1\tx\r\nline 2")
    request.job.job_id = job.job_id
    updated = await jobs_stub.UpdateJob(request, metadata=profile)
    assert updated.message == "line 1\tx\r\nline 2"


async def test_control_character_in_a_settings_key_is_invalid_argument(publisher_stub, profile):
    request = _publish_job(settings=["integration\n1"])
    details = await _refusal(publisher_stub.PublishJob(request, metadata=profile))
    assert "key must not contain control characters, got U+000A" in details


async def test_more_media_in_all_posts_than_one_post_may_hold_is_invalid_argument(
    publisher_stub, profile
):
    request = _media(MAX_MEDIA)
    while sum(len(value.media) for value in request.posts[0].values) <= MAX_MEDIA_IN_ALL:
        request.posts[0].values.append(request.posts[0].values[0])
    details = await _refusal(publisher_stub.CreatePost(request, metadata=profile))
    assert details.startswith(f"posts hold more than {MAX_MEDIA_IN_ALL} media in all")


async def test_unknown_update_path_longer_than_any_known_is_refused_without_echoing_it(
    jobs_stub, profile
):
    request = _update_with_paths(0)
    request.update_mask.paths.append("p" * 100_000)
    details = await _refusal(jobs_stub.UpdateJob(request, metadata=profile))
    assert details == "update_mask.paths is longer than 64 characters"


async def test_control_characters_in_a_text_preview_become_spaces_not_a_refusal(
    costs_stub, profile
):
    request = _tts(text_preview="Hello\x00world\x1b!\nBye")
    entry = (await costs_stub.RecordElevenLabsTTS(request, metadata=profile)).entry
    assert entry.attributes["text_preview"] == "Hello world !\nBye"
