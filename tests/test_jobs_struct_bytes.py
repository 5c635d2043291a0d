"""A job's data and result are stored as JSON and as the Struct bytes replies are built from
(migration 0004): a row without the bytes is read from its JSON, and bytes made stale by a
hand edit of the JSON are dropped, never sent."""

import json
import uuid

import asyncpg
import pytest
from google.protobuf import field_mask_pb2, json_format, struct_pb2
from jobs.v1 import jobs_pb2

from tests.conftest import as_profile, new_profile_id


@pytest.fixture
async def connection(database_url):
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


async def _stored(connection: asyncpg.Connection, job_id: str) -> asyncpg.Record:
    return await connection.fetchrow(
        "SELECT data::text AS data, data_pb, result_pb FROM jobs.jobs WHERE job_id = $1",
        uuid.UUID(job_id),
    )


async def _create(jobs_stub, profile, **data) -> jobs_pb2.Job:
    job = jobs_pb2.Job(kind="video_render")
    job.data.update(data)
    return await jobs_stub.CreateJob(jobs_pb2.CreateJobRequest(job=job), metadata=profile)


async def test_a_job_is_stored_as_json_and_as_the_struct_bytes_it_is_sent_as(jobs_stub, connection):
    profile = as_profile(new_profile_id())
    created = await _create(jobs_stub, profile, product="sku-1", scenes=[1, 2])
    stored = await _stored(connection, created.job_id)
    assert json.loads(stored["data"]) == {"scenes": [1, 2], "product": "sku-1"}
    assert struct_pb2.Struct.FromString(stored["data_pb"]) == created.data
    read = await jobs_stub.GetJob(jobs_pb2.GetJobRequest(job_id=created.job_id), metadata=profile)
    assert read.data == created.data


async def test_progress_updates_keep_the_bytes_and_data_updates_replace_both(jobs_stub, connection):
    profile = as_profile(new_profile_id())
    created = await _create(jobs_stub, profile, product="sku-1")
    before = await _stored(connection, created.job_id)
    progress = jobs_pb2.UpdateJobRequest(
        job=jobs_pb2.Job(job_id=created.job_id, progress=50),
        update_mask=field_mask_pb2.FieldMask(paths=["progress"]),
    )
    await jobs_stub.UpdateJob(progress, metadata=profile)
    assert await _stored(connection, created.job_id) == before

    change = jobs_pb2.UpdateJobRequest(
        job=jobs_pb2.Job(job_id=created.job_id),
        update_mask=field_mask_pb2.FieldMask(paths=["data", "result"]),
    )
    change.job.data.update({"product": "sku-2"})
    change.job.result.update({"video_url": "https://cdn.example/v.mp4"})
    updated = await jobs_stub.UpdateJob(change, metadata=profile)
    after = await _stored(connection, created.job_id)
    assert json.loads(after["data"]) == {"product": "sku-2"}
    assert struct_pb2.Struct.FromString(after["data_pb"]) == updated.data == change.job.data
    assert struct_pb2.Struct.FromString(after["result_pb"]) == change.job.result


async def test_a_row_written_without_the_bytes_is_read_from_its_json(jobs_stub, connection):
    profile_id = new_profile_id()
    job_id = await connection.fetchval(
        """INSERT INTO jobs.jobs (profile_id, kind, data)
        VALUES ($1, 'video_render', '{"product": "sku-3", "n": [1, {"deep": true}]}')
        RETURNING job_id::text""",
        profile_id,
    )
    read = await jobs_stub.GetJob(
        jobs_pb2.GetJobRequest(job_id=job_id), metadata=as_profile(profile_id)
    )
    assert json_format.MessageToDict(read.data) == {"product": "sku-3", "n": [1, {"deep": True}]}
    listed = await jobs_stub.ListJobs(jobs_pb2.ListJobsRequest(), metadata=as_profile(profile_id))
    assert [job.data for job in listed.jobs] == [read.data]


async def test_a_hand_edit_of_the_json_drops_the_stale_bytes(jobs_stub, connection):
    profile = as_profile(new_profile_id())
    created = await _create(jobs_stub, profile, product="sku-1")
    await connection.execute(
        """UPDATE jobs.jobs SET data = '{"product": "fixed by hand"}' WHERE job_id = $1""",
        uuid.UUID(created.job_id),
    )
    assert (await _stored(connection, created.job_id))["data_pb"] is None
    read = await jobs_stub.GetJob(jobs_pb2.GetJobRequest(job_id=created.job_id), metadata=profile)
    assert json_format.MessageToDict(read.data) == {"product": "fixed by hand"}


async def test_fields_protobuf_does_not_know_are_not_stored(jobs_stub, connection):
    """A Struct carrying an unknown field (number 99, 1,000 bytes) is stored without it."""
    profile = as_profile(new_profile_id())
    request = jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="video_render"))
    request.job.data.update({"product": "sku-1"})
    unknown = b"\x9a\x06" + bytes([0xE8, 0x07]) + b"u" * 1000  # field 99, length 1,000
    data = request.job.data.SerializeToString() + unknown
    request.job.data.Clear()
    request.job.data.MergeFromString(data)
    assert request.job.data.ByteSize() > 1000
    created = await jobs_stub.CreateJob(request, metadata=profile)
    stored = await _stored(connection, created.job_id)
    assert len(stored["data_pb"]) < 100
