"""The README's runnable examples, run as written: the grpcurl tour of Jobs, a worker's
lease, the Costs calls and the Publisher's walkthrough against the fake Postiz, each a shell
block pasted into bash.

The services run as `make run` starts them, on ports of the test's own: the blocks' ports,
the fake Postiz's address, its key file and the profile (a fresh one) are the only things
replaced. A block that fails (a renamed field, a changed reply) fails the test with its
output.
"""

import asyncio
import json
import os
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from services.costs.service import costs_definition
from services.jobs.service import JOBS
from services.publisher.fake_postiz import serve_fake_postiz
from services.publisher.service import publisher_definition
from services.runtime.local_suite import SAMPLE_VIDEO
from services.runtime.server import RunningService, ServiceDefinition
from services.runtime.settings import Settings
from tests.conftest import (
    REPO,
    new_profile_id,
    publisher_config,
    running,
    settings_for,
    signed_in,
)

README = REPO / "README.md"
OPERATIONS = REPO / "docs/operations.md"


def shell_blocks(after: str, count: int, document: Path = README) -> list[str]:
    """The first `count` ```sh blocks of the document after the line `after` starts."""
    text = document.read_text()
    start = text.index(after)
    return re.findall(r"```sh\n(.*?)```", text[start:], re.DOTALL)[:count]


async def run_blocks(
    blocks: list[str],
    replacements: dict[str, str],
    cwd: Path = REPO,
    env: dict[str, str] | None = None,
) -> str:
    """The blocks run one after the other in one bash, from the repository's root unless
    another directory is given."""
    script = "\n".join(blocks)
    for old, new in replacements.items():
        script = script.replace(old, new)
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        script,
        cwd=cwd,
        env=os.environ | {"PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}"} | (env or {}),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, output.decode()[-4000:]
    return output.decode()


def ports(jobs: RunningService, costs: RunningService, publisher: RunningService) -> dict[str, str]:
    return {
        "localhost:50051": f"127.0.0.1:{jobs.port}",
        "localhost:50052": f"127.0.0.1:{costs.port}",
        "localhost:50053": f"127.0.0.1:{publisher.port}",
    }


async def test_the_grpcurl_tour_of_jobs_runs_as_written(
    jobs_service, costs_service, publisher_service
):
    profile_id = new_profile_id()
    (tour,) = shell_blocks("## Trying it with grpcurl", 1)
    output = await run_blocks(
        [tour],
        ports(jobs_service, costs_service, publisher_service) | {"store-1": profile_id},
    )
    assert f'"profile_id": "{profile_id}"' in output
    assert '"progress": 40' in output
    assert output.count('"status": "COMPLETED"') >= 2  # the update's reply, and the watch
    assert '"status": "SERVING"' in output


async def test_a_workers_lease_runs_as_written(jobs_service, costs_service, publisher_service):
    """Its kind is made the test's own: leasing takes pending jobs of every profile."""
    profile_id, kind = new_profile_id(), f"readme-{uuid.uuid4().hex[:12]}"
    (lease,) = shell_blocks("A worker's side, as pasted", 1)
    output = await run_blocks(
        [lease],
        ports(jobs_service, costs_service, publisher_service)
        | {"store-1": profile_id, "video_render": kind},
    )
    assert '"progress": 50' in output
    assert '"worker": "render-1"' in output  # the attempt the lease made, ended
    assert '"outcome": "COMPLETED"' in output
    assert '"video_url": "https://cdn.example/v.mp4"' in output


async def test_the_costs_calls_run_as_written(jobs_service, costs_service, publisher_service):
    profile_id = new_profile_id()
    (costs,) = shell_blocks("As pasted (the summary covers this calendar month", 1)
    output = await run_blocks(
        [costs], ports(jobs_service, costs_service, publisher_service) | {"store-1": profile_id}
    )
    assert '"voice_id": "21m00Tcm4TlvDq8ikWAM"' in output  # the summary's row by voice
    assert '"allowed": true' in output


@pytest.fixture
async def local_fake_postiz(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A fake Postiz as `make run` starts it: its base URL, and the file holding its key."""
    async with serve_fake_postiz() as fake:
        organization = fake.add_organization()
        fake.files["sample.mp4"] = SAMPLE_VIDEO
        key_file = tmp_path / "fake-postiz-key"
        key_file.write_text(organization.api_key + "\n")
        yield fake.base_url, key_file


async def test_the_publishers_walkthrough_runs_as_written(
    jobs_service, costs_service, publisher_service, local_fake_postiz
):
    base_url, key_file = local_fake_postiz
    profile_id = new_profile_id()
    blocks = shell_blocks("**Try it locally.**", 2)
    output = await run_blocks(
        blocks,
        ports(jobs_service, costs_service, publisher_service)
        | {
            "store-1": profile_id,
            "http://127.0.0.1:50060": base_url,
            ".data/fake-postiz-key": str(key_file),
        },
    )
    assert '"api_key_fingerprint": "sha256:' in output
    assert '"state": "PUBLICATION_STATE_ACCEPTED"' in output
    assert '"publication": {' in output  # written back into the job's result


def _jwt_settings(
    database_url: str, public_keys: Path, definition: ServiceDefinition = JOBS
) -> Settings:
    """A service as the manifests configure it: ES256 public keys, its own gRPC name as the
    audience, the issuer."""
    return settings_for(
        database_url,
        auth_mode="jwt",
        auth_jwt_public_key=str(public_keys),
        auth_jwt_audience=definition.grpc_service,
        auth_jwt_issuer="video-pipeline",
    )


@asynccontextmanager
async def jwt_suite(
    database_url: str, public_keys: Path, spool: Path
) -> AsyncIterator[tuple[RunningService, RunningService, RunningService]]:
    """The three services with AUTH_MODE=jwt, checking tokens with `public_keys`."""
    async with running(JOBS, _jwt_settings(database_url, public_keys)) as jobs:
        costs = costs_definition(spool_path=spool)
        publisher = publisher_definition(publisher_config(jobs))
        async with (
            running(costs, _jwt_settings(database_url, public_keys, costs)) as costs_up,
            running(publisher, _jwt_settings(database_url, public_keys, publisher)) as publisher_up,
        ):
            yield jobs, costs_up, publisher_up


async def test_the_token_and_profile_examples_run_as_written(database_url, tmp_path):
    """The README's keys block makes a key pair and a token and calls with it; its operator's
    block mints an operator token with the same key and reads across profiles; then
    docs/operations.md's block exports and deletes the profile with suitectl. The services
    start once the keys block has made their public keys (where its `kubectl` line would
    hand them to a cluster, the one line not run)."""
    profile_id = new_profile_id()
    (keys,) = shell_blocks("**Keys stay with whoever mints.**", 1)
    (operator,) = shell_blocks("**Operator scope.**", 1)
    (lifecycle,) = shell_blocks("## A profile's data", 1, OPERATIONS)
    before, kubectl, after = re.split(r"^(kubectl .*)$", keys, maxsplit=1, flags=re.M)
    assert "create configmap auth-jwt" in kubectl
    await run_blocks([before], {}, cwd=tmp_path)
    suite = jwt_suite(database_url, tmp_path / "public-keys.json", tmp_path / "spool.jsonl")
    async with suite as (jobs, costs, publisher):
        replacements = ports(jobs, costs, publisher) | {"store-1": profile_id}
        targets = {
            "JOBS_TARGET": replacements["localhost:50051"],
            "COSTS_TARGET": replacements["localhost:50052"],
            "PUBLISHER_TARGET": replacements["localhost:50053"],
        }
        made = await run_blocks([after, operator], replacements, cwd=tmp_path)
        deleted = await run_blocks([lifecycle], replacements, cwd=tmp_path, env=targets)
    assert made.count(f'"profile_id": "{profile_id}"') == 2  # made, then listed by the operator
    assert (tmp_path / "token-key-1.pem").stat().st_mode & 0o777 == 0o600
    [exported] = (tmp_path / f"{profile_id}.jsonl").read_text().splitlines()
    assert json.loads(exported)["record"]["profile_id"] == profile_id
    counts = re.findall(r"^jobs +jobs +(\d+)$", deleted, re.M)
    assert counts == ["1", "1", "1"]  # the dry run, then what was there and was deleted


async def test_the_dev_overlays_token_example_is_accepted_by_the_dev_overlays_keys(
    database_url,
):
    """The dev overlay's signing key, as the README mints with it, makes tokens the public
    keys the overlay gives its services accept."""
    (mint,) = shell_blocks("The dev overlay gives the services", 1)
    profile_id = new_profile_id()
    token = (await run_blocks([mint], {"store-1": profile_id})).strip()
    public_keys = REPO / "deploy/k8s/overlays/dev/auth-jwt-dev-public-keys.json"
    async with (
        running(JOBS, _jwt_settings(database_url, public_keys)) as jobs,
        grpc.aio.insecure_channel(f"127.0.0.1:{jobs.port}") as channel,
    ):
        listed = await jobs_pb2_grpc.JobServiceStub(channel).ListJobs(
            jobs_pb2.ListJobsRequest(), metadata=signed_in(profile_id, token)
        )
    assert list(listed.jobs) == []
