"""Migrations: idempotent, and applied once when replicas start at the same time."""

import asyncio
from pathlib import Path

import asyncpg
import pytest

from services.jobs.service import JOBS
from services.runtime.embedded_postgres import scratch_database
from services.runtime.migrations import apply_migrations, migration_files


@pytest.fixture
async def empty_database_url(admin_database_url):
    async with scratch_database(admin_database_url, "migrations") as url:
        yield url


async def _apply(url: str) -> list[int]:
    connection = await asyncpg.connect(url)
    try:
        return await apply_migrations(connection, JOBS.name, JOBS.migrations)
    finally:
        await connection.close()


async def test_second_run_applies_nothing(empty_database_url):
    first = await _apply(empty_database_url)
    assert first == [version for version, _ in migration_files(JOBS.migrations)]
    assert await _apply(empty_database_url) == []


async def test_concurrent_runs_apply_each_migration_once(empty_database_url):
    results = await asyncio.gather(*(_apply(empty_database_url) for _ in range(4)))
    applied = sorted(version for result in results for version in result)
    assert applied == [version for version, _ in migration_files(JOBS.migrations)]


def test_duplicate_versions_are_refused(tmp_path: Path):
    (tmp_path / "0001_a.sql").write_text("SELECT 1")
    (tmp_path / "0001_b.sql").write_text("SELECT 1")
    with pytest.raises(ValueError, match="duplicate"):
        migration_files(tmp_path)


async def test_a_failing_migration_leaves_nothing_behind(empty_database_url, tmp_path: Path):
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE jobs.kept (x int)")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE jobs.broken (")
    connection = await asyncpg.connect(empty_database_url)
    try:
        with pytest.raises(asyncpg.PostgresSyntaxError):
            await apply_migrations(connection, "jobs", tmp_path)
        assert await connection.fetchval("SELECT to_regclass('jobs.kept')") is None
    finally:
        await connection.close()
