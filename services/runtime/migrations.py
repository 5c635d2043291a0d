"""Versioned SQL migrations, one folder of numbered files per service.

Applied by `python -m services.<name> migrate` and at start-up. All pending files run in one
transaction under an advisory lock, so two replicas starting at once apply them once.
"""

import logging
import re
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

_FILE_NAME = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")


def migration_files(folder: Path) -> list[tuple[int, Path]]:
    """The folder's `NNNN_name.sql` files in version order; versions must be unique."""
    found = sorted(
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if (match := _FILE_NAME.fullmatch(path.name))
    )
    versions = [version for version, _ in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions in {folder}")
    return found


async def apply_migrations(connection: asyncpg.Connection, schema: str, folder: Path) -> list[int]:
    """Applies the pending migrations of `schema`; returns the versions applied."""
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"migrate:{schema}")
        await connection.execute(
            f"""
            CREATE SCHEMA IF NOT EXISTS {schema};
            CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        applied = {
            row["version"]
            for row in await connection.fetch(f"SELECT version FROM {schema}.schema_migrations")
        }
        done = []
        for version, path in migration_files(folder):
            if version in applied:
                continue
            await connection.execute(path.read_text())
            await connection.execute(
                f"INSERT INTO {schema}.schema_migrations (version, name) VALUES ($1, $2)",
                version,
                path.name,
            )
            log.info("applied migration %s/%s", schema, path.name)
            done.append(version)
    return done
