"""`make bench` runs end to end (its quick mode); the figures themselves come from full runs."""

import asyncio
import json
import os
import sys

import pytest

from bench.line_costs import VARIANTS
from tests.conftest import REPO


async def test_quick_benchmark_reports_every_operation(admin_database_url, tmp_path):
    report = tmp_path / "bench.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--json",
        str(report),
        cwd=REPO,
        env=os.environ | {"DATABASE_URL": admin_database_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=240)
    assert process.returncode == 0, output.decode()[-3000:]
    rows = {row["operation"]: row for row in json.loads(report.read_text())["rows"]}
    for name in (
        "no-op gRPC + interceptor",
        "CreateJob",
        "GetJob",
        "UpdateJob",
        "ListJobs first page",
        "ListJobs deep page",
    ):
        assert rows[name]["per_second"] > 0
        assert rows[name]["ratio"] > 0
    assert any(name.startswith("WatchJob fan-out") for name in rows)
    # Round trips per call, counted on the wire (tests/test_round_trips.py checks their values).
    counted = {f["operation"]: f for f in json.loads(report.read_text())["round_trips"]}
    assert counted["GetJob"]["round_trips"] == 1
    assert set(counted) >= {"CreateJob", "RecordElevenLabsTTS", "CheckBudget"}
    assert any(name.startswith("GetJob, 2 worker(s)") for name in rows)
    # The workers' queue: throughput at 4 and 16 workers, and every small profile's job
    # leased beside the backlog.
    leasing = json.loads(report.read_text())["leasing"]
    assert [row["workers"] for row in leasing["throughput"]] == [4, 16]
    assert all(row["jobs_per_second"] > 0 for row in leasing["throughput"])
    options = leasing["options"]
    assert leasing["fairness"]["small_jobs"] == options["small_profiles"] * options["small_jobs"]
    # What a call costs the machine: the server's, the database's (it runs on this machine
    # here) and the benchmark client's own CPU; the database-only rows have no server.
    get_job = rows["GetJob"]
    assert get_job["server_cpu_us_per_call"] > 0
    assert get_job["database_cpu_us_per_call"] > 0
    assert get_job["client_cpu_us_per_call"] > 0
    spent = sum(get_job[f"{part}_cpu_us_per_call"] for part in ("server", "database", "client"))
    cores = len(os.sched_getaffinity(0))
    assert get_job["machine_bound_per_second"] == pytest.approx(cores * 1e6 / spent, rel=1e-3)


async def test_input_costs_measures_the_value_budget_and_the_refusal():
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.input_costs",
        "--repeat",
        "1",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, output.decode()
    lines = output.decode().splitlines()
    assert len(lines) == 5
    assert "240,000 empty lists" in lines[-1]
    assert lines[-1].endswith("refused")


async def test_line_costs_measures_each_schema_variant(admin_database_url):
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.line_costs",
        "--quick",
        cwd=REPO,
        env=os.environ | {"DATABASE_URL": admin_database_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, output.decode()
    header, *rows = output.decode().splitlines()
    assert header.split()[0] == "schema"
    assert [row.rsplit(maxsplit=2)[0].strip() for row in rows] == list(VARIANTS)
    assert all(row.endswith(" µs") for row in rows)
