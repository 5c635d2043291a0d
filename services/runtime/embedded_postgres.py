"""Databases for development: an embedded PostgreSQL under `.data/`, for `make run`, the
tests and the benchmark when DATABASE_URL is unset (so a newcomer needs no database
installed), and scratch databases made on a server for one run and dropped after it."""

import logging
import secrets
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

DEFAULT_DATA_DIR = Path(".data/postgres")
# Where `make run` leaves the URL of the database it serves from, for `suitectl migrate` and
# people: the embedded server's URL names a socket directory nobody would guess.
LOCAL_DATABASE_URL_FILE = Path(".data/database-url")


def local_database_url() -> str | None:
    """The database `make run` serves from in this checkout, if it has run."""
    try:
        return LOCAL_DATABASE_URL_FILE.read_text().strip() or None
    except OSError:
        return None


def start_embedded_postgres(data_dir: Path = DEFAULT_DATA_DIR) -> str:
    """Starts (or reuses) the server in data_dir and returns its connection URL.

    The server stops when the last process that started it exits.
    """
    # pgserver keeps its lock under the user's runtime folder, which platformdirs finds in
    # XDG_RUNTIME_DIR and otherwise warns it does not (as root in a container, say) before
    # falling back to /tmp: nothing a newcomer can act on, so not shown.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import pgserver  # a development dependency: production always sets DATABASE_URL

        # pgserver narrates every pg_ctl call, even from atexit after logging has shut down.
        logging.getLogger("pgserver").setLevel(logging.WARNING)
        data_dir.mkdir(parents=True, exist_ok=True)
        server = pgserver.get_server(data_dir.resolve(), cleanup_mode="stop")
    return server.get_uri()


def with_database(url: str, database: str) -> str:
    """The same server's URL, naming another database."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@asynccontextmanager
async def scratch_database(admin_url: str, prefix: str) -> AsyncIterator[str]:
    """A new, empty database on admin_url's server, dropped (connections and all) after."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        try:
            yield with_database(admin_url, name)
        finally:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()
