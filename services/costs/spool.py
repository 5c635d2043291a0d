"""The durable local spool: record requests the database could not take yet.

What it guarantees:

- An append returns only once its lines are written and fsync'd, so an acknowledged line
  survives a crash of the process or the node (and, on a persistent volume, the pod).
- A failed append (disk full, I/O error) is cut off again before the error is raised, and a
  torn last line that a crash left is cut off when the spool is opened: acknowledgement
  follows the fsync, so a torn line was never acknowledged. It is dropped, not
  dead-lettered: nobody waits for it and it holds nothing that could be replayed.
- The spool holds at most `max_bytes`; past that an append raises Unavailable ("spool
  full"), rather than accept a line it cannot keep.
- Replay streams the file a batch of lines at a time, in bounded memory whatever its size.
  It renames the file aside, records it, and deletes it once every line is either in the
  database or in the dead-letter file; a replay cut short is run again, and idempotency on
  request_id keeps a line recorded twice from counting twice.
- A line that cannot be parsed, or that the database refuses for good (the record function
  raises LineRefused), goes to the dead-letter file next to the spool, in the spool's own
  format, and replay goes on. After fixing the cause, an operator appends that file to the
  spool and restarts the service, which replays it.
- One process at a time: the spool is locked (flock) while open.
"""

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from itertools import groupby, islice
from pathlib import Path
from typing import BinaryIO

import orjson

from services.costs.metrics import SPOOL_DEAD_LETTERED, SPOOL_LINES
from services.costs.model import UsageLine
from services.runtime.errors import Unavailable
from suite_client.usage_outbox import fsync_directory

log = logging.getLogger(__name__)

# Lines read, parsed and recorded at a time: what replay holds in memory.
REPLAY_BATCH_LINES = 1000
# Below this much room (in the spool's cap or on the volume) the spool counts as full.
SPOOL_HEADROOM_BYTES = 4096
_CHUNK_BYTES = 1 << 20


class LineRefused(Exception):
    """Raised by a record function: the database refuses these lines for good."""


RecordBatch = Callable[[str, list[UsageLine]], Awaitable[None]]


def encode_line(profile_id: str, line: UsageLine) -> bytes:
    """One spool line (JSON, which escapes every newline inside strings), newline included."""
    return orjson.dumps({"profile_id": profile_id, "line": line.as_json()}) + b"\n"


def decode_line(raw: bytes) -> tuple[str, UsageLine]:
    """(profile_id, line); ValueError, KeyError, TypeError or ArithmeticError if malformed."""
    decoded = orjson.loads(raw)
    return decoded["profile_id"], UsageLine.from_json(decoded["line"])


_UNREADABLE = (ValueError, KeyError, TypeError, AttributeError, ArithmeticError)


def append_durably(path: Path, data: bytes) -> None:
    """Appends `data` and fsyncs it; on any error the file is cut back to where it was."""
    created = not path.exists()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        start = os.lseek(descriptor, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view) :]
            os.fsync(descriptor)
        except BaseException:
            os.ftruncate(descriptor, start)
            os.fsync(descriptor)
            raise
    finally:
        os.close(descriptor)
    if created:
        fsync_directory(path.parent)


def _cut_torn_tail(path: Path) -> int:
    """Truncates the file after its last newline; the bytes cut off."""
    if not path.exists():
        return 0
    with path.open("r+b") as file:
        size = file.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - _CHUNK_BYTES)
            file.seek(start)
            newline = file.read(end - start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end == size:
            return 0
        file.truncate(end)
        file.flush()
        os.fsync(file.fileno())
    return size - end


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    lines = 0
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK_BYTES):
            lines += chunk.count(b"\n")
    return lines


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


# A spooled line as read back: the raw bytes and the line, or why it cannot be parsed.
ReadLine = tuple[bytes, tuple[str, UsageLine] | Exception]


def _read_batch(lines: Iterator[bytes]) -> list[ReadLine]:
    batch: list[ReadLine] = []
    for raw in islice(lines, REPLAY_BATCH_LINES):
        try:
            batch.append((raw, decode_line(raw)))
        except _UNREADABLE as error:
            batch.append((raw, error))
    return batch


class Spool:
    """Open it before use (`await spool.open()`), close it after."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.dead_letter_path = path.with_name(path.name + ".dead-letter")
        self._replaying = path.with_name(path.name + ".replaying")
        self._lock_path = path.with_name(path.name + ".lock")
        self._lock_file: BinaryIO | None = None
        self._bytes = 0  # in the spool and the file being replayed
        self._lines = 0
        self._append_lock = asyncio.Lock()
        self._drain_lock = asyncio.Lock()

    async def open(self) -> None:
        """Locks the spool, cuts off a torn last line and counts what a previous run left."""
        await asyncio.to_thread(self._open)
        SPOOL_LINES.inc(self._lines)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = self._lock_path.open("ab")
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise RuntimeError(
                f"the spool {self.path} is in use by another process; every Costs server "
                "process needs a COSTS_SPOOL_PATH of its own"
            ) from None
        self._lock_file = lock_file
        for path in (self._replaying, self.path):
            if cut := _cut_torn_tail(path):
                log.warning(
                    "cut off a torn last line of %d byte(s) from %s (a write that never "
                    "completed, so never acknowledged)",
                    cut,
                    path,
                )
        self._bytes = _size(self.path) + _size(self._replaying)
        self._lines = _count_lines(self.path) + _count_lines(self._replaying)

    async def close(self) -> None:
        SPOOL_LINES.dec(self._lines)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def is_empty(self) -> bool:
        return self._bytes == 0

    def accepts_lines(self) -> bool:
        """True while an append would fit: room under `max_bytes` and on a writable volume."""
        if self._bytes + SPOOL_HEADROOM_BYTES > self.max_bytes:
            return False
        try:
            volume = os.statvfs(self.path.parent)
        except OSError:
            return False
        free = volume.f_bavail * volume.f_frsize
        return free >= SPOOL_HEADROOM_BYTES and os.access(self.path.parent, os.W_OK)

    async def append(self, profile_id: str, lines: Sequence[UsageLine]) -> None:
        """Returns once the lines are on disk; Unavailable if the spool cannot keep them."""
        data = b"".join(encode_line(profile_id, line) for line in lines)
        async with self._append_lock:
            if self._bytes + len(data) > self.max_bytes:
                raise Unavailable(
                    f"the database is unavailable and this replica's spool is full "
                    f"({self._bytes} of {self.max_bytes} bytes, COSTS_SPOOL_MAX_BYTES); "
                    "retry later"
                )
            try:
                await asyncio.to_thread(append_durably, self.path, data)
            except OSError as error:
                log.error("cannot write the spool %s: %s", self.path, error)
                raise Unavailable(
                    "the database is unavailable and this replica's spool cannot be written; "
                    "retry later"
                ) from error
            self._bytes += len(data)
            self._lines += len(lines)
        SPOOL_LINES.inc(len(lines))
        log.warning("database unavailable: %d line(s) spooled to %s", len(lines), self.path)

    async def drain(self, record: RecordBatch) -> int:
        """Records every spooled line with `record(profile_id, lines)`; returns how many
        were replayed (dead-lettered lines included).

        An error from `record` other than LineRefused (the database still down) propagates
        and leaves the lines not yet confirmed in place for the next drain.
        """
        drained = 0
        async with self._drain_lock:
            while True:
                if not self._replaying.exists():
                    async with self._append_lock:
                        if _size(self.path) == 0:
                            return drained
                        os.replace(self.path, self._replaying)
                        await asyncio.to_thread(fsync_directory, self.path.parent)
                drained += await self._replay_file(record)

    async def _replay_file(self, record: RecordBatch) -> int:
        size = _size(self._replaying)
        number = 0
        with self._replaying.open("rb") as file:
            # The next batch is read and parsed (in a thread) while this one is recorded:
            # two batches in memory at most.
            reading = asyncio.ensure_future(asyncio.to_thread(_read_batch, file))
            try:
                while batch := await reading:
                    reading = asyncio.ensure_future(asyncio.to_thread(_read_batch, file))
                    entries = []
                    for raw, parsed in batch:
                        number += 1
                        if isinstance(parsed, Exception):
                            why = f"line {number}: {parsed!r}"
                            await self._dead_letter(raw, "unreadable", why)
                        else:
                            entries.append((raw, *parsed))
                    for profile_id, group in groupby(entries, key=lambda entry: entry[1]):
                        await self._record_group(
                            record, profile_id, [(r, line) for r, _, line in group]
                        )
            finally:
                with contextlib.suppress(BaseException):  # the file is not closed under it
                    await reading
        self._replaying.unlink()
        await asyncio.to_thread(fsync_directory, self.path.parent)
        async with self._append_lock:
            self._bytes -= size
            self._lines -= number
        SPOOL_LINES.dec(number)  # only once the whole file is confirmed
        log.info("replayed %d spooled line(s) from %s", number, self.path)
        return number

    async def _record_group(
        self, record: RecordBatch, profile_id: str, entries: list[tuple[bytes, UsageLine]]
    ) -> None:
        """The lines in one call; if refused, each alone, so only the refused ones go."""
        try:
            await record(profile_id, [line for _, line in entries])
            return
        except LineRefused:
            pass
        for raw, line in entries:
            try:
                await record(profile_id, [line])
            except LineRefused as refusal:
                await self._dead_letter(raw, "refused", f"{line.request_id!r}: {refusal}")

    async def _dead_letter(self, raw: bytes, reason: str, why: str) -> None:
        data = raw if raw.endswith(b"\n") else raw + b"\n"
        await asyncio.to_thread(append_durably, self.dead_letter_path, data)
        SPOOL_DEAD_LETTERED.labels(reason).inc()
        log.error("spool line dead-lettered (%s) to %s: %s", reason, self.dead_letter_path, why)
