"""LOG_FORMAT=json: one JSON object per line with the fields log pipelines index."""

import json
import logging
import sys
import uuid

import grpc
import pytest
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from services.runtime.call_context import profile_scope
from services.runtime.logs import JsonFormatter
from tests.conftest import as_profile, new_profile_id, server_process


async def test_service_process_with_json_format_writes_only_json_lines(database_url):
    profile_id = new_profile_id()
    async with server_process("jobs", database_url, LOG_FORMAT="json") as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await jobs_pb2_grpc.JobServiceStub(channel).GetJob(
                    jobs_pb2.GetJobRequest(job_id=str(uuid.uuid4())),
                    metadata=as_profile(profile_id),
                )
        assert await server.terminate() == 0
    lines = [json.loads(line) for line in server.output]
    assert all(line["service"] == "jobs" for line in lines)
    assert all(
        {"time", "level", "logger", "profile_id", "trace_id", "message"} <= line.keys()
        for line in lines
    )
    access = [line for line in lines if line.get("method") == "/jobs.v1.JobService/GetJob"]
    assert len(access) == 1
    assert access[0]["status"] == "NOT_FOUND"
    assert access[0]["profile_id"] == profile_id
    assert access[0]["duration_ms"] >= 0
    assert access[0]["level"] == "INFO"


def test_json_line_carries_the_profile_of_the_running_call_and_the_error():
    logger = logging.getLogger("test.json")
    with profile_scope("store-json"):
        record = logger.makeRecord(
            "test.json", logging.ERROR, __file__, 1, "failed %s", ("here",), None
        )
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = json.loads(JsonFormatter("jobs").format(record))
    assert line["profile_id"] == "store-json"
    assert line["message"] == "failed here"
    assert "ValueError: boom" in line["error"]
    assert line["trace_id"] is None
