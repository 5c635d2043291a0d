"""The durable local spool: record requests the database could not take yet.

Each append is written and fsync'd before the caller is told "accepted", so an acknowledged
line survives a crash of the service or the node (when the path is on a persistent volume).
Replay renames the file aside, records it, and deletes it only once every line is in the
database; a replay cut short is simply run again, and idempotency on request_id keeps a line
recorded twice from counting twice.
"""

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from itertools import groupby
from pathlib import Path

from services.costs.metrics import SPOOL_LINES
from services.costs.model import UsageLine

log = logging.getLogger(__name__)

RecordBatch = Callable[[str, list[UsageLine]], Awaitable[None]]


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._replaying = path.with_name(path.name + ".replaying")
        self._append_lock = asyncio.Lock()
        self._drain_lock = asyncio.Lock()
        # What a previous run left counts as waiting too.
        SPOOL_LINES.inc(sum(len(self._read(p)) for p in (path, self._replaying) if p.exists()))

    def is_empty(self) -> bool:
        return not any(p.exists() and p.stat().st_size > 0 for p in (self.path, self._replaying))

    async def append(self, profile_id: str, lines: Sequence[UsageLine]) -> None:
        """Returns once the lines are on disk."""
        text = "".join(
            json.dumps({"profile_id": profile_id, "line": line.as_json()}) + "\n" for line in lines
        )
        async with self._append_lock:
            await asyncio.to_thread(self._write, text)
        SPOOL_LINES.inc(len(lines))
        log.warning("database unavailable: %d line(s) spooled to %s", len(lines), self.path)

    def _write(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        with self.path.open("a", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if created:
            _fsync_directory(self.path.parent)

    async def drain(self, record: RecordBatch) -> int:
        """Records every spooled line with `record(profile_id, lines)`; returns how many.

        An error from `record` (the database still down) propagates and leaves the lines not
        yet confirmed in place for the next drain.
        """
        drained = 0
        async with self._drain_lock:
            while True:
                if not self._replaying.exists():
                    async with self._append_lock:
                        if not self.path.exists() or self.path.stat().st_size == 0:
                            return drained
                        os.replace(self.path, self._replaying)
                        await asyncio.to_thread(_fsync_directory, self.path.parent)
                entries = self._read(self._replaying)
                for profile_id, group in groupby(entries, key=lambda e: e[0]):
                    lines = [line for _, line in group]
                    await record(profile_id, lines)
                    drained += len(lines)
                self._replaying.unlink()
                SPOOL_LINES.dec(len(entries))  # only once the whole file is confirmed
                await asyncio.to_thread(_fsync_directory, self.path.parent)
                log.info("replayed %d spooled line(s) from %s", len(entries), self.path)

    @staticmethod
    def _read(path: Path) -> list[tuple[str, UsageLine]]:
        entries = []
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                decoded = json.loads(text)
                entries.append((decoded["profile_id"], UsageLine.from_json(decoded["line"])))
            except (ValueError, KeyError, TypeError):
                # Only a crash in the middle of an append leaves a torn line, never acknowledged.
                log.error("skipping unreadable spool line %d of %s", number, path)
        return entries
