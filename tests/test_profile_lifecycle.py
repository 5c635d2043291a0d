"""A profile's whole lifecycle for operators: ExportProfile and DeleteProfile on each service,
only with operator scope, logged with who called, and never touching another profile."""

import asyncio
import json
import logging
import re
import uuid

import grpc
import pytest
from costs.v1 import costs_pb2
from google.protobuf import field_mask_pb2
from jobs.v1 import jobs_pb2
from publisher.v1 import publisher_pb2

from services.costs.service import costs_definition
from services.jobs.service import JOBS
from services.publisher.service import PUBLISHER
from services.runtime import lifecycle
from tests.conftest import (
    as_profile,
    connect_profile,
    expect_status,
    new_profile_id,
    record_tts,
    signed_in,
    token_for,
)
from tests.publisher_requests import post_request
from tests.test_suitectl import suitectl

Code = grpc.StatusCode


async def _jobs(stub, metadata, count: int) -> list[jobs_pb2.Job]:
    return [
        await stub.CreateJob(
            jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind=f"render-{n}")), metadata=metadata
        )
        for n in range(count)
    ]


async def _exported(call) -> list:
    return [page async for page in call]


async def _a_profile_with_data(jobs_stub, costs_stub, publisher_stub, fake_postiz):
    """A profile connected to Postiz with two jobs, a cost line, a budget and a publication."""
    connected = await connect_profile(publisher_stub, fake_postiz)
    metadata = connected.metadata
    jobs = await _jobs(jobs_stub, metadata, 2)
    entry = await record_tts(costs_stub, metadata)
    await costs_stub.SetBudget(
        costs_pb2.SetBudgetRequest(period=costs_pb2.MONTHLY, limit_usd="50"), metadata=metadata
    )
    publication = await publisher_stub.CreatePost(post_request(connected), metadata=metadata)
    return connected, jobs, entry, publication


def test_every_service_takes_its_lifecycle_calls_from_operators_only():
    for definition, service in (
        (JOBS, jobs_pb2.DESCRIPTOR.services_by_name["JobService"]),
        (costs_definition(), costs_pb2.DESCRIPTOR.services_by_name["CostService"]),
        (PUBLISHER, publisher_pb2.DESCRIPTOR.services_by_name["PublisherService"]),
    ):
        assert {"ExportProfile", "DeleteProfile"} <= set(service.methods_by_name)
        assert definition.operator_methods == {
            f"/{service.full_name}/ExportProfile",
            f"/{service.full_name}/DeleteProfile",
        }


async def test_export_holds_everything_of_the_profile_and_nothing_of_another(
    jobs_stub, costs_stub, publisher_stub, fake_postiz
):
    mine = await _a_profile_with_data(jobs_stub, costs_stub, publisher_stub, fake_postiz)
    other = await _a_profile_with_data(jobs_stub, costs_stub, publisher_stub, fake_postiz)
    connected, jobs, entry, publication = mine
    metadata = connected.metadata

    job_pages = await _exported(
        jobs_stub.ExportProfile(jobs_pb2.ExportProfileRequest(), metadata=metadata)
    )
    assert [j.job_id for page in job_pages for j in page.jobs] == [j.job_id for j in reversed(jobs)]
    cost_pages = await _exported(
        costs_stub.ExportProfile(costs_pb2.ExportProfileRequest(), metadata=metadata)
    )
    assert [e.entry_id for page in cost_pages for e in page.entries] == [entry.entry_id]
    [budget] = [b for page in cost_pages for b in page.budgets]
    assert (budget.period, budget.limit_usd) == (costs_pb2.MONTHLY, "50")
    publisher_pages = await _exported(
        publisher_stub.ExportProfile(publisher_pb2.ExportProfileRequest(), metadata=metadata)
    )
    first = publisher_pages[0]
    stored = await publisher_stub.GetPostizCredentials(
        publisher_pb2.GetPostizCredentialsRequest(), metadata=metadata
    )
    assert first.credentials.api_key_fingerprint == stored.api_key_fingerprint
    [exported] = [p for page in publisher_pages for p in page.publications]
    assert exported.publication.request_id == publication.request_id
    assert exported.postiz_request["posts"][0]["value"][0]["content"] == "A new video is out"

    every_byte = b"".join(
        page.SerializeToString() for page in [*job_pages, *cost_pages, *publisher_pages]
    )
    assert connected.organization.api_key.encode() not in every_byte
    other_connected, other_jobs, other_entry, other_publication = other
    for foreign in (
        other_jobs[0].job_id,
        other_entry.entry_id,
        other_publication.request_id,
        other_connected.organization.api_key,
    ):
        assert foreign.encode() not in every_byte


async def test_export_of_a_profile_with_nothing_is_one_empty_page(
    jobs_stub, costs_stub, publisher_stub
):
    metadata = as_profile(new_profile_id())
    for stub, messages in (
        (jobs_stub, jobs_pb2),
        (costs_stub, costs_pb2),
        (publisher_stub, publisher_pb2),
    ):
        pages = await _exported(
            stub.ExportProfile(messages.ExportProfileRequest(), metadata=metadata)
        )
        assert [page.ByteSize() for page in pages] == [0]


async def test_export_pages_through_every_row_once(jobs_stub, costs_stub, monkeypatch):
    for module in ("services.jobs.servicer", "services.costs.servicer"):
        monkeypatch.setattr(f"{module}.EXPORT_PAGE_ROWS", 2)
    metadata = as_profile(new_profile_id())
    jobs = await _jobs(jobs_stub, metadata, 5)
    entries = [await record_tts(costs_stub, metadata) for _ in range(5)]
    job_pages = await _exported(
        jobs_stub.ExportProfile(jobs_pb2.ExportProfileRequest(), metadata=metadata)
    )
    assert [len(page.jobs) for page in job_pages] == [2, 2, 1]
    assert [j.job_id for page in job_pages for j in page.jobs] == [j.job_id for j in reversed(jobs)]
    cost_pages = await _exported(
        costs_stub.ExportProfile(costs_pb2.ExportProfileRequest(), metadata=metadata)
    )
    assert [len(page.entries) for page in cost_pages] == [2, 2, 1]
    assert sorted(e.entry_id for page in cost_pages for e in page.entries) == sorted(
        e.entry_id for e in entries
    )


async def test_delete_counts_first_then_deletes_the_profile_and_keeps_its_cost_lines(
    jobs_stub, costs_stub, publisher_stub, fake_postiz
):
    connected, jobs, entry, _ = await _a_profile_with_data(
        jobs_stub, costs_stub, publisher_stub, fake_postiz
    )
    other, other_jobs, _, _ = await _a_profile_with_data(
        jobs_stub, costs_stub, publisher_stub, fake_postiz
    )
    metadata = connected.metadata
    validate = {"validate_only": True}

    counted = await publisher_stub.DeleteProfile(
        publisher_pb2.DeleteProfileRequest(**validate), metadata=metadata
    )
    assert (counted.credentials, counted.publications, counted.done) == (1, 1, True)
    counted_jobs = await jobs_stub.DeleteProfile(
        jobs_pb2.DeleteProfileRequest(**validate), metadata=metadata
    )
    assert (counted_jobs.jobs, counted_jobs.done) == (2, True)
    counted_costs = await costs_stub.DeleteProfile(
        costs_pb2.DeleteProfileRequest(**validate), metadata=metadata
    )
    assert (counted_costs.budgets, counted_costs.cost_entries_kept) == (1, 1)
    # Counting deleted nothing.
    await jobs_stub.GetJob(jobs_pb2.GetJobRequest(job_id=jobs[0].job_id), metadata=metadata)

    deleted = await publisher_stub.DeleteProfile(
        publisher_pb2.DeleteProfileRequest(), metadata=metadata
    )
    assert (deleted.credentials, deleted.publications, deleted.done) == (1, 1, True)
    deleted_jobs = await jobs_stub.DeleteProfile(jobs_pb2.DeleteProfileRequest(), metadata=metadata)
    assert (deleted_jobs.jobs, deleted_jobs.done) == (2, True)
    deleted_costs = await costs_stub.DeleteProfile(
        costs_pb2.DeleteProfileRequest(), metadata=metadata
    )
    assert (deleted_costs.budgets, deleted_costs.cost_entries_kept) == (1, 1)

    for job in jobs:
        await expect_status(
            jobs_stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=metadata),
            Code.NOT_FOUND,
        )
    await expect_status(
        publisher_stub.GetPostizCredentials(
            publisher_pb2.GetPostizCredentialsRequest(), metadata=metadata
        ),
        Code.NOT_FOUND,
    )
    await expect_status(
        costs_stub.GetBudget(
            costs_pb2.GetBudgetRequest(period=costs_pb2.MONTHLY), metadata=metadata
        ),
        Code.NOT_FOUND,
    )
    publisher_pages = await _exported(
        publisher_stub.ExportProfile(publisher_pb2.ExportProfileRequest(), metadata=metadata)
    )
    assert [page.ByteSize() for page in publisher_pages] == [0]
    kept = await costs_stub.ListCostEntries(costs_pb2.ListCostEntriesRequest(), metadata=metadata)
    assert [e.entry_id for e in kept.entries] == [entry.entry_id]

    # The other profile keeps everything.
    await jobs_stub.GetJob(
        jobs_pb2.GetJobRequest(job_id=other_jobs[0].job_id), metadata=other.metadata
    )
    await costs_stub.GetBudget(
        costs_pb2.GetBudgetRequest(period=costs_pb2.MONTHLY), metadata=other.metadata
    )
    again = await publisher_stub.DeleteProfile(
        publisher_pb2.DeleteProfileRequest(validate_only=True), metadata=other.metadata
    )
    assert (again.credentials, again.publications) == (1, 1)
    # Deleting again finds nothing and fails nothing.
    empty = await jobs_stub.DeleteProfile(jobs_pb2.DeleteProfileRequest(), metadata=metadata)
    assert (empty.jobs, empty.done) == (0, True)


async def test_delete_stops_at_its_time_bound_and_goes_on_when_called_again(jobs_stub, monkeypatch):
    monkeypatch.setattr(lifecycle, "DELETE_BATCH_ROWS", 2)
    monkeypatch.setattr(lifecycle, "DELETE_SECONDS_PER_CALL", 0.0)
    metadata = as_profile(new_profile_id())
    await _jobs(jobs_stub, metadata, 5)
    replies = []
    while not replies or not replies[-1].done:
        replies.append(
            await jobs_stub.DeleteProfile(jobs_pb2.DeleteProfileRequest(), metadata=metadata)
        )
    assert [(r.jobs, r.done) for r in replies] == [(2, False), (2, False), (1, True)]


async def test_a_watcher_of_a_deleted_profiles_job_is_told_it_is_gone(jobs_stub):
    metadata = as_profile(new_profile_id())
    [job] = await _jobs(jobs_stub, metadata, 1)
    watch = jobs_stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=metadata)
    first = await watch.read()
    assert first.job_id == job.job_id
    await jobs_stub.DeleteProfile(jobs_pb2.DeleteProfileRequest(), metadata=metadata)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await asyncio.wait_for(watch.read(), 10)
    assert raised.value.code() == Code.NOT_FOUND


async def test_a_worker_holding_a_deleted_job_finds_it_gone(jobs_stub):
    metadata = as_profile(new_profile_id())
    kind = f"lifecycle-{uuid.uuid4().hex[:8]}"
    job = await jobs_stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind=kind)), metadata=metadata
    )
    leased = await jobs_stub.LeaseJobs(jobs_pb2.LeaseJobsRequest(kinds=[kind], worker="w"))
    [held] = leased.jobs
    assert held.job_id == job.job_id
    await jobs_stub.DeleteProfile(jobs_pb2.DeleteProfileRequest(), metadata=metadata)
    update = jobs_pb2.UpdateJobRequest(
        job=jobs_pb2.Job(job_id=job.job_id, progress=50),
        update_mask=field_mask_pb2.FieldMask(paths=["progress"]),
        lease_id=held.lease.lease_id,
    )
    await expect_status(jobs_stub.UpdateJob(update, metadata=metadata), Code.NOT_FOUND)


@pytest.mark.parametrize("rpc", ["ExportProfile", "DeleteProfile"])
async def test_only_an_operator_token_may_call_a_profiles_lifecycle(jwt_jobs_stub, rpc):
    profile_id = new_profile_id()
    request = getattr(jobs_pb2, f"{rpc}Request")()

    async def call(metadata):
        reply = getattr(jwt_jobs_stub, rpc)(request, metadata=metadata)
        if rpc == "ExportProfile":
            return await _exported(reply)
        return await reply

    details = await expect_status(call(signed_in(profile_id)), Code.PERMISSION_DENIED)
    assert "scope operator" in details
    worker = token_for(worker=True)
    await expect_status(call(signed_in(profile_id, worker)), Code.PERMISSION_DENIED)
    await expect_status(call(as_profile(profile_id)), Code.UNAUTHENTICATED)
    await call(signed_in(profile_id, token_for(operator=True)))


async def test_an_operators_deletion_is_logged_with_who_and_what(jwt_jobs_stub, caplog):
    caplog.set_level(logging.INFO, logger="services.operator")
    profile_id = new_profile_id()
    await _jobs(jwt_jobs_stub, signed_in(profile_id), 2)
    operator = signed_in(profile_id, token_for(operator=True))
    await jwt_jobs_stub.DeleteProfile(jobs_pb2.DeleteProfileRequest(), metadata=operator)
    lines = [r.getMessage() for r in caplog.records if r.name == "services.operator"]
    assert (
        f"operator test-caller calls /jobs.v1.JobService/DeleteProfile for profile {profile_id}"
        in lines
    )
    assert "operator test-caller deleted the profile's 2 jobs" in lines


async def test_suitectl_exports_a_profile_as_json_lines(
    targets, jobs_stub, costs_stub, publisher_stub, fake_postiz, tmp_path
):
    connected, jobs, entry, publication = await _a_profile_with_data(
        jobs_stub, costs_stub, publisher_stub, fake_postiz
    )
    profile_id = dict(connected.metadata)["x-profile-id"]
    output = tmp_path / "export.jsonl"
    outcome = await suitectl(*targets, "profile", "export", profile_id, "--output", str(output))
    assert outcome.exit_code == 0, outcome.stderr
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    kinds = [(line["service"], line["kind"]) for line in lines]
    assert kinds == [
        ("jobs", "job"),
        ("jobs", "job"),
        ("costs", "budget"),
        ("costs", "cost_entry"),
        ("publisher", "postiz_credentials"),
        ("publisher", "publication"),
    ]
    records = [line["record"] for line in lines]
    assert records[0]["job_id"] == jobs[1].job_id  # grpcurl's field names
    assert records[3]["entry_id"] == entry.entry_id
    assert records[5]["publication"]["request_id"] == publication.request_id
    assert connected.organization.api_key not in output.read_text()
    assert "exported 2 job, 1 budget, 1 cost_entry" in outcome.stderr


async def test_suitectl_deletes_a_profile_once_confirmed(
    targets, jobs_stub, costs_stub, publisher_stub, fake_postiz
):
    connected, jobs, _, _ = await _a_profile_with_data(
        jobs_stub, costs_stub, publisher_stub, fake_postiz
    )
    profile_id = dict(connected.metadata)["x-profile-id"]
    expected = {
        "Postiz credentials": "1",
        "publications": "1",
        "jobs": "2",
        "budgets": "1",
        "cost lines (kept)": "1",
    }

    def table(text: str) -> dict[str, str]:
        """WHAT → COUNT of the service rows (columns are two spaces apart or more)."""
        rows = [
            re.split(r" {2,}", line)
            for line in text.splitlines()
            if line.startswith(("jobs ", "costs ", "publisher "))
        ]
        return {what: count for _, what, count in rows}

    shown = await suitectl(*targets, "profile", "delete", profile_id, "--dry-run")
    assert shown.exit_code == 0, shown.stderr
    assert table(shown.stdout) == expected
    refused = await suitectl(*targets, "profile", "delete", profile_id)
    assert refused.exit_code == 1
    assert "nothing deleted: add --yes" in refused.stderr
    await jobs_stub.GetJob(
        jobs_pb2.GetJobRequest(job_id=jobs[0].job_id), metadata=connected.metadata
    )

    deleted = await suitectl(*targets, "profile", "delete", profile_id, "--yes")
    assert deleted.exit_code == 0, deleted.stderr
    after = deleted.stdout.split(f"profile {profile_id}: deleted")[1]
    assert table(after) == expected
    again = await suitectl(*targets, "profile", "delete", profile_id, "--dry-run")
    assert table(again.stdout) == {key: "0" for key in expected} | {"cost lines (kept)": "1"}
