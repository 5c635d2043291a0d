"""`suitectl`, run as operators run it (the installed command) against the started suite."""

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from jobs.v1 import jobs_pb2
from publisher.v1 import publisher_pb2

from services.publisher.fake_postiz import api_root
from tests.conftest import as_profile, new_profile_id, record_tts, signed_in, token_for

SUITECTL = Path(sys.executable).parent / "suitectl"


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str


async def suitectl(*args: str, stdin: str = "", **env: str) -> Outcome:
    process = await asyncio.create_subprocess_exec(
        SUITECTL,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=os.environ | env,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(stdin.encode()), 60)
    assert process.returncode is not None
    return Outcome(process.returncode, stdout.decode(), stderr.decode())


async def test_help_names_every_command():
    outcome = await suitectl("--help")
    assert outcome.exit_code == 0
    for command in ("migrate", "health", "postiz", "jobs", "costs", "profile"):
        assert command in outcome.stdout


async def test_health_reports_every_service_serving(targets):
    outcome = await suitectl(*targets, "health")
    assert outcome.exit_code == 0, outcome.stderr
    header, *lines = outcome.stdout.splitlines()
    assert header.split() == ["SERVICE", "TARGET", "STATUS"]
    assert [line.split()[0] for line in lines] == ["jobs", "costs", "publisher"]
    assert all(line.endswith("SERVING") for line in lines)


async def test_health_fails_when_a_service_cannot_be_reached(targets):
    outcome = await suitectl(*targets, "--jobs-target=127.0.0.1:1", "health")
    assert outcome.exit_code == 1
    assert "UNREACHABLE" in outcome.stdout
    assert "not every service is serving" in outcome.stderr


async def test_jobs_list_shows_the_profiles_jobs_and_no_others(targets, jobs_stub):
    profile_id = new_profile_id()
    mine = [
        await jobs_stub.CreateJob(
            jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind=f"render-{n}")),
            metadata=as_profile(profile_id),
        )
        for n in range(2)
    ]
    other = await jobs_stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="other")),
        metadata=as_profile(new_profile_id()),
    )
    outcome = await suitectl(*targets, "jobs", "list", "--profile", profile_id)
    assert outcome.exit_code == 0, outcome.stderr
    header, *rows = outcome.stdout.splitlines()
    assert header.split() == ["JOB", "STATUS", "PROGRESS", "UPDATED", "(UTC)", "KIND"]
    assert [row.split()[0] for row in rows] == [job.job_id for job in reversed(mine)]
    assert other.job_id not in outcome.stdout


async def test_jobs_list_as_json_is_one_array_with_grpcurls_field_names(targets, jobs_stub):
    profile_id = new_profile_id()
    job = await jobs_stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="render")),
        metadata=as_profile(profile_id),
    )
    outcome = await suitectl(*targets, "jobs", "list", "--profile", profile_id, "--json")
    [listed] = json.loads(outcome.stdout)
    assert (listed["job_id"], listed["profile_id"], listed["status"]) == (
        job.job_id,
        profile_id,
        "PENDING",
    )


async def test_an_empty_list_as_json_is_an_empty_array(targets):
    outcome = await suitectl(*targets, "jobs", "list", "--profile", new_profile_id(), "--json")
    assert outcome.exit_code == 0, outcome.stderr
    assert json.loads(outcome.stdout) == []


async def test_a_reader_that_stops_early_ends_the_command_quietly(targets, jobs_stub):
    profile_id = new_profile_id()
    for _ in range(3):
        await jobs_stub.CreateJob(
            jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="render")),
            metadata=as_profile(profile_id),
        )
    command = " ".join([str(SUITECTL), *targets, "jobs", "list", "--profile", profile_id])
    process = await asyncio.create_subprocess_shell(
        f"{command} --json | head -c 1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert stdout == b"["
    assert stderr == b""


async def test_help_shows_every_options_default():
    outcome = await suitectl("--help")
    assert "(default: 30.0)" in outcome.stdout.replace("\n", " ")
    listing = await suitectl("jobs", "list", "--help")
    assert "(default: 50)" in listing.stdout


async def test_postiz_set_credentials_reads_the_key_from_stdin(
    targets, publisher_stub, fake_postiz
):
    organization = fake_postiz.add_organization()
    profile_id = new_profile_id()
    outcome = await suitectl(
        *targets,
        "postiz",
        "set-credentials",
        "--profile",
        profile_id,
        "--base-url",
        api_root(fake_postiz),
        stdin=organization.api_key + "\n",
    )
    assert outcome.exit_code == 0, outcome.stderr
    assert organization.api_key not in outcome.stdout + outcome.stderr
    stored = await publisher_stub.GetPostizCredentials(
        publisher_pb2.GetPostizCredentialsRequest(), metadata=as_profile(profile_id)
    )
    assert stored.base_url == api_root(fake_postiz)
    assert stored.api_key_fingerprint in outcome.stdout


async def test_postiz_get_and_delete_credentials_show_the_fingerprint_never_the_key(
    targets, fake_postiz
):
    organization = fake_postiz.add_organization()
    profile_id = new_profile_id()
    profile = ["--profile", profile_id]
    await suitectl(
        *targets,
        "postiz",
        "set-credentials",
        *profile,
        "--base-url",
        api_root(fake_postiz),
        stdin=organization.api_key + "\n",
    )
    shown = await suitectl(*targets, "postiz", "get-credentials", *profile, "--json")
    assert shown.exit_code == 0, shown.stderr
    stored = json.loads(shown.stdout)
    assert stored["base_url"] == api_root(fake_postiz)
    assert stored["api_key_fingerprint"].startswith("sha256:")
    assert organization.api_key not in shown.stdout
    deleted = await suitectl(*targets, "postiz", "delete-credentials", *profile)
    assert deleted.exit_code == 0, deleted.stderr
    gone = await suitectl(*targets, "postiz", "get-credentials", *profile)
    assert gone.exit_code == 1
    assert "NOT_FOUND" in gone.stderr


async def test_postiz_set_credentials_without_a_key_on_stdin_fails(targets, fake_postiz):
    outcome = await suitectl(
        *targets,
        "postiz",
        "set-credentials",
        "--profile",
        new_profile_id(),
        "--base-url",
        api_root(fake_postiz),
    )
    assert outcome.exit_code == 1
    assert "no API key on stdin" in outcome.stderr


async def test_a_refused_call_ends_with_the_services_answer(targets, fake_postiz):
    outcome = await suitectl(
        *targets,
        "postiz",
        "set-credentials",
        "--profile",
        new_profile_id(),
        "--base-url",
        api_root(fake_postiz),
        stdin="not-a-key-postiz-knows\n",
    )
    assert outcome.exit_code == 1
    assert "SetPostizCredentials answered FAILED_PRECONDITION" in outcome.stderr


async def test_migrate_applies_every_services_migrations(database_url):
    outcome = await suitectl("migrate", DATABASE_URL=database_url)
    assert outcome.exit_code == 0, outcome.stderr
    assert outcome.stdout.splitlines() == [
        "jobs: migrations applied",
        "costs: migrations applied",
        "publisher: migrations applied",
    ]


async def test_migrate_without_database_url_uses_the_database_make_run_saved(
    database_url, tmp_path
):
    (tmp_path / ".data").mkdir()
    (tmp_path / ".data" / "database-url").write_text(database_url + "\n")
    environment = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    process = await asyncio.create_subprocess_exec(
        SUITECTL,
        "migrate",
        cwd=tmp_path,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    assert "DATABASE_URL from .data/database-url" in stderr.decode()
    assert stdout.decode().splitlines()[0] == "jobs: migrations applied"


async def test_costs_month_shows_the_profiles_spend_by_model(targets, costs_stub):
    profile_id = new_profile_id()
    await record_tts(costs_stub, as_profile(profile_id), characters=2000, request_id="a")
    await record_tts(costs_stub, as_profile(new_profile_id()), characters=9000, request_id="a")
    outcome = await suitectl(*targets, "costs", "month", "--profile", profile_id)
    assert outcome.exit_code == 0, outcome.stderr
    total, header, *rows = outcome.stdout.splitlines()
    assert total.endswith(": 0.1 USD")
    assert header.split() == ["PROVIDER", "MODEL", "COST", "(USD)", "LINES"]
    assert [row.split() for row in rows] == [["elevenlabs", "eleven_flash_v2_5", "0.1", "1"]]


async def test_costs_month_by_voice_has_a_row_per_voice(targets, costs_stub):
    profile_id = new_profile_id()
    for voice in ("v-a", "v-b", "v-b"):
        await record_tts(costs_stub, as_profile(profile_id), characters=1000, voice_id=voice)
    outcome = await suitectl(*targets, "costs", "month", "--profile", profile_id, "--by-voice")
    assert outcome.exit_code == 0, outcome.stderr
    _, header, *rows = outcome.stdout.splitlines()
    assert header.split() == ["PROVIDER", "MODEL", "VOICE", "COST", "(USD)", "LINES"]
    assert [row.split() for row in rows] == [
        ["elevenlabs", "eleven_flash_v2_5", "v-a", "0.05", "1"],
        ["elevenlabs", "eleven_flash_v2_5", "v-b", "0.1", "2"],
    ]


async def test_costs_of_a_month_without_spend_is_zero(targets):
    outcome = await suitectl(
        *targets, "costs", "month", "--profile", new_profile_id(), "--month", "2020-01", "--json"
    )
    assert outcome.exit_code == 0, outcome.stderr
    assert json.loads(outcome.stdout)["total_cost_usd"] == "0"


async def test_costs_month_refuses_a_malformed_month(targets):
    outcome = await suitectl(*targets, "costs", "month", "--profile", "p", "--month", "11/2026")
    assert outcome.exit_code == 2
    assert "YYYY-MM" in outcome.stderr


async def test_jobs_stats_and_leases_show_the_work_queue(targets, jobs_stub):
    kind = f"ctl-{new_profile_id()[-12:]}"
    profile_id = new_profile_id()
    for _ in range(2):
        await jobs_stub.CreateJob(
            jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind=kind)), metadata=as_profile(profile_id)
        )
    request = jobs_pb2.LeaseJobsRequest(kinds=[kind], worker="ctl-worker")
    [leased] = (await jobs_stub.LeaseJobs(request)).jobs

    stats = await suitectl(*targets, "jobs", "stats", "--limit", "1000")
    assert stats.exit_code == 0, stats.stderr
    header, *rows = stats.stdout.splitlines()
    assert header.split() == ["KIND", "PROFILE", "PENDING", "READY", "OLDEST", "LEASED"]
    [row] = [row.split() for row in rows if row.startswith(kind)]
    assert (row[1], row[2], row[3], row[5]) == (profile_id, "1", "1", "1")

    leases = await suitectl(*targets, "jobs", "leases", "--within", "120", "--json")
    assert leases.exit_code == 0, leases.stderr
    [mine] = [lease for lease in json.loads(leases.stdout) if lease["job_id"] == leased.job_id]
    assert (mine["worker"], mine["profile_id"]) == ("ctl-worker", profile_id)


async def test_with_auth_mode_jwt_suitectl_calls_on_the_token_it_is_given(
    jwt_jobs_service, jwt_jobs_stub, tmp_path
):
    target = f"--jobs-target=127.0.0.1:{jwt_jobs_service.port}"
    profile_id = new_profile_id()
    job = await jwt_jobs_stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="render")), metadata=signed_in(profile_id)
    )
    refused = await suitectl(target, "jobs", "list", "--profile", profile_id)
    assert refused.exit_code == 1
    assert "UNAUTHENTICATED" in refused.stderr
    listed = await suitectl(
        target,
        "jobs",
        "list",
        "--profile",
        profile_id,
        "--json",
        SUITECTL_TOKEN=token_for(profile_id),
    )
    assert listed.exit_code == 0, listed.stderr
    assert [j["job_id"] for j in json.loads(listed.stdout)] == [job.job_id]
    # An operator's token from a file, for the cross-profile view; never echoed.
    token_file = tmp_path / "operator.token"
    token_file.write_text(token_for(operator=True) + "\n")
    stats = await suitectl(target, "--token-file", str(token_file), "jobs", "stats")
    assert stats.exit_code == 0, stats.stderr
    assert stats.stdout.splitlines()[0].split()[0] == "KIND"
    assert token_file.read_text().strip() not in stats.stdout + stats.stderr
