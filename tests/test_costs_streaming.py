"""costs.v1.CostService.StreamUsage: batch ingestion with accepted and duplicate counts."""

import grpc
from costs.v1 import costs_pb2

from tests.conftest import expect_status

Code = grpc.StatusCode


def usage(request_id: str, quantity: str = "1") -> costs_pb2.StreamUsageRequest:
    return costs_pb2.StreamUsageRequest(
        lines=[
            costs_pb2.UsageLine(
                usage=costs_pb2.RecordUsageRequest(
                    request_id=request_id,
                    provider="acme",
                    model="voice-1",
                    unit="seconds",
                    quantity=quantity,
                )
            )
        ]
    )


def tts(request_id: str) -> costs_pb2.StreamUsageRequest:
    return costs_pb2.StreamUsageRequest(
        lines=[
            costs_pb2.UsageLine(
                elevenlabs_tts=costs_pb2.RecordElevenLabsTTSRequest(
                    request_id=request_id, model_id="eleven_flash_v2_5", characters=100
                )
            )
        ]
    )


def gemini(request_id: str) -> costs_pb2.StreamUsageRequest:
    return costs_pb2.StreamUsageRequest(
        lines=[
            costs_pb2.UsageLine(
                gemini=costs_pb2.RecordGeminiUsageRequest(
                    request_id=request_id, model="gemini-2.5-flash", prompt_tokens=100
                )
            )
        ]
    )


async def test_stream_usage_counts_accepted_lines_of_every_kind(costs_stub, profile):
    response = await costs_stub.StreamUsage(
        iter([usage("u-1"), tts("t-1"), gemini("g-1")]), metadata=profile
    )
    assert (response.accepted, response.duplicates, response.spooled) == (3, 0, 0)
    listed = await costs_stub.ListCostEntries(costs_pb2.ListCostEntriesRequest(), metadata=profile)
    assert {e.provider for e in listed.entries} == {"acme", "elevenlabs", "gemini"}


async def test_stream_usage_counts_lines_already_recorded_as_duplicates(costs_stub, profile):
    await costs_stub.StreamUsage(iter([usage("u-1"), usage("u-2")]), metadata=profile)
    response = await costs_stub.StreamUsage(
        iter([usage("u-2"), usage("u-3"), usage("u-3")]), metadata=profile
    )
    assert (response.accepted, response.duplicates) == (1, 2)


async def test_stream_usage_larger_than_a_batch_records_every_line(costs_stub, profile):
    response = await costs_stub.StreamUsage(
        (usage(f"u-{n}") for n in range(1234)), metadata=profile
    )
    assert (response.accepted, response.duplicates) == (1234, 0)


async def test_stream_usage_with_a_bad_line_records_nothing_and_names_the_line(costs_stub, profile):
    details = await expect_status(
        costs_stub.StreamUsage(
            iter([usage("u-1"), usage("u-2", quantity="lots")]), metadata=profile
        ),
        Code.INVALID_ARGUMENT,
    )
    assert details.startswith("line 2: quantity")
    assert details.endswith("the 1 line(s) before it are recorded")
    listed = await costs_stub.ListCostEntries(costs_pb2.ListCostEntriesRequest(), metadata=profile)
    assert [e.request_id for e in listed.entries] == ["u-1"]


async def test_stream_usage_message_without_a_line_is_invalid(costs_stub, profile):
    details = await expect_status(
        costs_stub.StreamUsage(
            iter([costs_pb2.StreamUsageRequest(lines=[costs_pb2.UsageLine()])]), metadata=profile
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "line must set one of" in details


async def test_stream_usage_takes_many_lines_in_one_message(costs_stub, profile):
    lines = [line for n in range(250) for line in usage(f"many-{n}").lines]
    messages = [
        costs_pb2.StreamUsageRequest(lines=lines[:200]),
        costs_pb2.StreamUsageRequest(lines=lines[200:]),
    ]
    response = await costs_stub.StreamUsage(iter(messages), metadata=profile)
    assert (response.accepted, response.duplicates) == (250, 0)
    again = await costs_stub.StreamUsage(iter(messages), metadata=profile)
    assert (again.accepted, again.duplicates) == (0, 250)
