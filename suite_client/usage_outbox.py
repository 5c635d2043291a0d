"""The metering outbox: usage the Costs service has not confirmed yet, kept in a local file.

Every metered call's usage is appended and fsync'd here before it is sent, and leaves once
Costs has recorded it; so usage survives Costs being down and the worker stopping or
crashing. Whatever the file holds is sent again under the same request_id, which Costs
records once.

The file is JSON lines, only ever appended to: `{"usage": …}` when a line comes in,
`{"recorded": [profile_id, request_id]}` when it leaves. It is emptied whenever nothing waits,
and rewritten with only the waiting lines once it is past the cap and twice their size, so it
stays under twice the cap. One process at a time: a second opener gets OutboxInUse.
"""

import asyncio
import fcntl
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (profile_id, request_id): what Costs records once


class OutboxFull(Exception):
    """The outbox holds its cap of usage Costs has not confirmed; nothing more is metered until
    Costs takes some (see Metering.flush)."""


class OutboxInUse(Exception):
    """Another process (or Metering) has this outbox open; give each worker its own path."""


@dataclass(frozen=True, slots=True)
class WaitingUsage:
    """One record call Costs has not confirmed: its RPC method and request (as JSON)."""

    profile_id: str
    request_id: str
    method: str
    request: dict[str, Any]

    @property
    def key(self) -> Key:
        return (self.profile_id, self.request_id)


def fsync_directory(path: Path) -> None:
    """Makes a file's creation, rename or truncation in `path` survive a crash."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _usage_line(usage: WaitingUsage) -> bytes:
    return (json.dumps({"usage": asdict(usage)}, separators=(",", ":")) + "\n").encode()


class UsageOutbox:
    """The waiting usage of one process, in the file at `path`, at most `max_bytes` of it."""

    def __init__(self, path: str | Path, max_bytes: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.path.with_name(self.path.name + ".lock"), "a")  # noqa: SIM115
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise OutboxInUse(f"the metering outbox {self.path} is open elsewhere") from None
        self._waiting: dict[Key, tuple[WaitingUsage, int]] = {}  # with its line's size
        self._waiting_bytes = 0
        self._io_lock = asyncio.Lock()
        self._empty = asyncio.Event()
        self._read()
        self._rewrite()
        self._file = open(self.path, "ab")  # noqa: SIM115
        self._file_bytes = self._file.tell()
        if self._waiting:
            log.warning("%d usage line(s) left waiting in %s", len(self._waiting), self.path)
        else:
            self._empty.set()

    def waiting(self) -> list[WaitingUsage]:
        """Every line Costs has not confirmed, oldest first."""
        return [usage for usage, _ in self._waiting.values()]

    async def emptied(self) -> None:
        """Returns once no line waits."""
        await self._empty.wait()

    def check_room(self) -> None:
        """OutboxFull when the outbox holds its cap; checked before money is spent."""
        if self._waiting_bytes >= self.max_bytes:
            raise OutboxFull(
                f"{len(self._waiting)} usage line(s) ({self._waiting_bytes} bytes) wait in "
                f"{self.path} for the Costs service, the cap is {self.max_bytes} bytes"
            )

    async def add(self, usage: WaitingUsage) -> None:
        """Returns once the line is on disk. Never refused: the money is already spent, so a
        line may pass the cap by what calls were in flight when check_room last passed."""
        line = _usage_line(usage)
        async with self._io_lock:
            await asyncio.to_thread(self._append, line, True)
            previous = self._waiting.pop(usage.key, None)
            self._waiting_bytes += len(line) - (previous[1] if previous else 0)
            self._waiting[usage.key] = (usage, len(line))
            self._empty.clear()

    async def remove(self, key: Key) -> None:
        """Costs has recorded the line. Not fsync'd: a mark lost in a crash only means the
        line is sent once more, and Costs records it once."""
        async with self._io_lock:
            entry = self._waiting.pop(key, None)
            if entry is None:
                return
            self._waiting_bytes -= entry[1]
            if not self._waiting:
                await asyncio.to_thread(self._truncate)
                self._empty.set()
                return
            line = (json.dumps({"recorded": list(key)}) + "\n").encode()
            await asyncio.to_thread(self._append, line, False)
            if self._file_bytes > max(2 * self._waiting_bytes, self.max_bytes):
                await asyncio.to_thread(self._compact)

    def close(self) -> None:
        self._file.close()
        self._lock_file.close()  # releases the lock

    def _append(self, line: bytes, durable: bool) -> None:
        self._file.write(line)
        self._file.flush()
        if durable:
            os.fsync(self._file.fileno())
        self._file_bytes += len(line)

    def _truncate(self) -> None:
        self._file.truncate(0)
        self._file_bytes = 0

    def _compact(self) -> None:
        self._file.close()
        self._rewrite()
        self._file = open(self.path, "ab")  # noqa: SIM115
        self._file_bytes = self._file.tell()

    def _rewrite(self) -> None:
        """The file with only the waiting lines, replaced atomically."""
        staged = self.path.with_name(self.path.name + ".compacting")
        with staged.open("wb") as file:
            for usage in self.waiting():
                file.write(_usage_line(usage))
            file.flush()
            os.fsync(file.fileno())
        os.replace(staged, self.path)
        fsync_directory(self.path.parent)

    def _read(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as file:
            for number, text in enumerate(file, start=1):
                try:
                    entry = json.loads(text)
                    if "usage" in entry:
                        usage = WaitingUsage(**entry["usage"])
                        self._waiting.pop(usage.key, None)
                        self._waiting[usage.key] = (usage, len(_usage_line(usage)))
                    else:
                        self._waiting.pop(tuple(entry["recorded"]), None)
                except (ValueError, KeyError, TypeError):
                    # Only a crash in the middle of an append tears a line; its add never
                    # returned, so its call never returned to the worker either.
                    log.error("skipping unreadable outbox line %d of %s", number, self.path)
        self._waiting_bytes = sum(size for _, size in self._waiting.values())
