"""WatchJob fan-out: one LISTEN connection per replica, however many watchers it serves.

A trigger notifies `jobs_job_changed` with the job's profile and id on every change. The hub
reads the changed job once, scoped to the profile named in the notification, builds its reply
once (`render`, the servicer's message converter) and hands that to every local watcher of the
job, so a watcher never learns anything of another profile's job and a thousand watchers of one
job cost one read and one conversion per change.

Memory stays bounded whatever watchers do: each watcher has a one-slot mailbox that keeps only
the newest state, so one that reads slowly (or not at all) skips to the latest state when it
reads again instead of queueing every change; one read per job is in flight at a time, changes
arriving meanwhile are folded into the next read; and a replica serves at most
`WatchLimits.per_profile` watchers of one profile and `per_replica` in all.

The same connection listens on `jobs_job_pending`, which a trigger notifies when a job becomes
PENDING (made, or put back after an expired lease): LeaseJobs calls waiting for work wake on it
(`work_arrived`) instead of polling.
"""

import asyncio
import contextlib
import json
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

import asyncpg

from services.jobs.metrics import WATCH_CHANGES, WATCHERS
from services.jobs.model import Job
from services.jobs.store import JobStore
from services.runtime.database import CONNECTION_ERRORS
from services.runtime.errors import DomainError, NotFound, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

CHANNEL: Final = "jobs_job_changed"
PENDING_CHANNEL: Final = "jobs_job_pending"
_DELETED: Final = object()
_CLOSED: Final = object()
# What a caller refused at its profile's watcher limit is told to wait before it tries again.
WATCHER_RETRY_SECONDS: Final = 5.0

WatchKey = tuple[str, uuid.UUID]
Reply = TypeVar("Reply")


@dataclass(frozen=True)
class WatchLimits:
    """How many WatchJob streams one replica serves: per profile, and in all."""

    per_profile: int = 100
    per_replica: int = 10_000


@dataclass(frozen=True, slots=True)
class _Change(Generic[Reply]):
    job: Job
    reply: Reply


class _Mailbox:
    """One slot: the newest change for one watcher (or the end of its stream), never a queue."""

    __slots__ = ("_item", "_ready")

    def __init__(self) -> None:
        self._item: object = None
        self._ready = asyncio.Event()

    def put(self, item: object) -> None:
        current = self._item
        if current is _CLOSED or (
            isinstance(current, _Change)
            and isinstance(item, _Change)
            and item.job.version <= current.job.version
        ):
            return
        self._item = item
        self._ready.set()

    async def take(self) -> object:
        await self._ready.wait()
        self._ready.clear()
        item, self._item = self._item, None
        return item


@dataclass
class _Watched:
    """The local watchers of one job, and whether a read of it is due or under way."""

    mailboxes: set[_Mailbox] = field(default_factory=set)
    reading: bool = False
    again: bool = False  # a change arrived during the read under way
    deleted: bool = False


class JobWatchHub(Generic[Reply]):
    def __init__(
        self,
        dsn: str,
        store: JobStore,
        render: Callable[[Job], Reply],
        limits: WatchLimits = WatchLimits(),
    ) -> None:
        self._dsn = dsn
        self._store = store
        self._render = render
        self._limits = limits
        self._watched: dict[WatchKey, _Watched] = {}
        self._watchers_of: Counter[str] = Counter()
        self._watchers = 0
        self._listener: asyncpg.Connection | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._work_waiters: set[asyncio.Future[None]] = set()
        self._closed = False

    async def start(self) -> None:
        await self._listen()

    async def close(self) -> None:
        """Ends every watch stream and releases the listener connection."""
        self._closed = True
        if self._reconnecting:
            self._reconnecting.cancel()
        for watched in self._watched.values():
            for mailbox in watched.mailboxes:
                mailbox.put(_CLOSED)
        self._wake_work_waiters()
        for task in list(self._tasks):
            task.cancel()
        if self._listener is not None:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await self._listener.close(timeout=2)

    async def watch(self, profile_id: str, job_id: uuid.UUID) -> AsyncIterator[Reply]:
        """The profile's job's reply now, then after each change (the latest, when changes
        come faster than the caller reads), ending after a terminal state or deletion."""
        if self._closed or self._listener is None or self._listener.is_closed():
            raise Unavailable("job watching is unavailable right now; retry shortly")
        self._admit(profile_id)
        key = (profile_id, job_id)
        mailbox = _Mailbox()
        # Registered before the first read, so no change slips between.
        self._watched.setdefault(key, _Watched()).mailboxes.add(mailbox)
        try:
            job = await self._store.get(profile_id, job_id)
            yield self._render(job)
            while not job.status.is_terminal:
                item = await mailbox.take()
                if item is _CLOSED:
                    return
                if item is _DELETED:
                    raise NotFound(f"job {job_id} was deleted")
                assert isinstance(item, _Change)
                if item.job.version <= job.version:
                    continue
                job = item.job
                yield item.reply
        finally:
            watched = self._watched.get(key)
            if watched is not None:
                watched.mailboxes.discard(mailbox)
                if not watched.mailboxes and not watched.reading:
                    del self._watched[key]
            self._watchers -= 1
            self._watchers_of[profile_id] -= 1
            if not self._watchers_of[profile_id]:
                del self._watchers_of[profile_id]
            WATCHERS.dec()

    async def work_arrived(self, within: float) -> None:
        """Returns once a job has become PENDING on any replica, or after `within` seconds,
        or at once when the hub closes; the caller then looks for work itself."""
        if self._closed:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._work_waiters.add(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await waiter
        finally:
            self._work_waiters.discard(waiter)

    def _wake_work_waiters(self, *_notification: object) -> None:
        for waiter in self._work_waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _admit(self, profile_id: str) -> None:
        if self._watchers >= self._limits.per_replica:
            raise ResourceExhausted(
                f"this replica already serves {self._limits.per_replica} WatchJob streams, the "
                "most it allows (JOBS_WATCHERS_PER_REPLICA); retry shortly",
                retry_after_seconds=1.0,
            )
        if self._watchers_of[profile_id] >= self._limits.per_profile:
            raise ResourceExhausted(
                f"this profile already has {self._limits.per_profile} WatchJob streams open on "
                "this replica, the most allowed (JOBS_WATCHERS_PER_PROFILE); end one first, "
                f"or retry in {WATCHER_RETRY_SECONDS:g}s",
                # Streams stay open as long as their callers like: no sooner than this.
                retry_after_seconds=WATCHER_RETRY_SECONDS,
            )
        self._watchers += 1
        self._watchers_of[profile_id] += 1
        WATCHERS.inc()

    async def _listen(self) -> None:
        connection = await asyncpg.connect(
            self._dsn, server_settings={"application_name": "jobs-watch"}
        )
        await connection.add_listener(CHANNEL, self._on_notification)
        await connection.add_listener(PENDING_CHANNEL, self._wake_work_waiters)
        connection.add_termination_listener(self._on_listener_lost)
        self._listener = connection

    def _on_notification(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if not self._watched:  # every change of every job comes here: read none unwatched
            return
        change = json.loads(payload)
        self._changed((change["profile_id"], uuid.UUID(change["job_id"])), change["deleted"])

    def _changed(self, key: WatchKey, deleted: bool) -> None:
        """Reads the job for its watchers now, or once more after the read under way."""
        watched = self._watched.get(key)
        if watched is None:
            return
        watched.deleted |= deleted
        if watched.reading:
            watched.again = True
            return
        watched.reading = True
        task = asyncio.ensure_future(self._deliver(key, watched))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_listener_lost(self, _conn: object) -> None:
        if not self._closed and (self._reconnecting is None or self._reconnecting.done()):
            log.warning("job watch listener lost; reconnecting")
            self._reconnecting = asyncio.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.1
        while not self._closed:
            try:
                await self._listen()
            except CONNECTION_ERRORS as error:
                log.warning("job watch listener cannot reconnect yet: %s", error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            log.info("job watch listener reconnected")
            self._wake_work_waiters()  # work may have arrived meanwhile
            for key in list(self._watched):  # changes may have been missed meanwhile
                self._changed(key, deleted=False)
            return

    async def _deliver(self, key: WatchKey, watched: _Watched) -> None:
        try:
            while True:
                watched.again = False
                item = await self._read(key, watched.deleted)
                if item is not None:
                    for mailbox in watched.mailboxes:
                        mailbox.put(item)
                if not watched.again:
                    return
        finally:
            watched.reading = False
            if not watched.mailboxes and self._watched.get(key) is watched:
                del self._watched[key]

    async def _read(self, key: WatchKey, deleted: bool) -> object:
        """The job's change built into a reply, _DELETED, or None when it cannot be read."""
        profile_id, job_id = key
        if deleted:
            return _DELETED
        try:
            job = await self._store.get(profile_id, job_id)
        except NotFound:
            return _DELETED
        except DomainError as error:
            log.warning("cannot read changed job %s: %s", job_id, error)
            return None
        WATCH_CHANGES.inc()
        return _Change(job, self._render(job))
