"""An embedded PostgreSQL under `.data/`, for `make run` and tests when DATABASE_URL is unset,
so a newcomer needs no database installed."""

import logging
from pathlib import Path

DEFAULT_DATA_DIR = Path(".data/postgres")


def start_embedded_postgres(data_dir: Path = DEFAULT_DATA_DIR) -> str:
    """Starts (or reuses) the server in data_dir and returns its connection URL.

    The server stops when the last process that started it exits.
    """
    import pgserver  # a development dependency: production always sets DATABASE_URL

    # pgserver narrates every pg_ctl call, even from atexit after logging has shut down.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    data_dir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(data_dir.resolve(), cleanup_mode="stop")
    return server.get_uri()
