"""WatchJob fan-out: one LISTEN connection per replica, however many watchers it serves.

A trigger notifies `jobs_job_changed` with the job's profile and id on every change. The hub
reads the changed job once, scoped to the profile named in the notification, and hands it to
every local watcher of that job, so a watcher never learns anything of another profile's job.
"""

import asyncio
import contextlib
import json
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Final

import asyncpg

from services.jobs.model import Job
from services.jobs.store import JobStore
from services.runtime.call_context import profile_scope, require_profile_id
from services.runtime.database import CONNECTION_ERRORS
from services.runtime.errors import DomainError, NotFound, Unavailable

log = logging.getLogger(__name__)

CHANNEL: Final = "jobs_job_changed"
_DELETED: Final = object()
_CLOSED: Final = object()

WatchKey = tuple[str, uuid.UUID]


class JobWatchHub:
    def __init__(self, dsn: str, store: JobStore) -> None:
        self._dsn = dsn
        self._store = store
        self._watchers: defaultdict[WatchKey, set[asyncio.Queue[object]]] = defaultdict(set)
        self._listener: asyncpg.Connection | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self) -> None:
        await self._listen()

    async def close(self) -> None:
        """Ends every watch stream and releases the listener connection."""
        self._closed = True
        if self._reconnecting:
            self._reconnecting.cancel()
        for queues in self._watchers.values():
            for queue in queues:
                queue.put_nowait(_CLOSED)
        for task in list(self._tasks):
            task.cancel()
        if self._listener is not None:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await self._listener.close(timeout=2)

    async def watch(self, job_id: uuid.UUID) -> AsyncIterator[Job]:
        """The job now, then each change, ending after a terminal state or deletion."""
        if self._closed or self._listener is None or self._listener.is_closed():
            raise Unavailable("job watching is unavailable right now; retry shortly")
        key = (require_profile_id(), job_id)
        queue: asyncio.Queue[object] = asyncio.Queue()
        self._watchers[key].add(queue)  # before the first read, so no change slips between
        try:
            job = await self._store.get(job_id)
            yield job
            last_version = job.version
            while not job.status.is_terminal:
                item = await queue.get()
                if item is _CLOSED:
                    return
                if item is _DELETED:
                    raise NotFound(f"job {job_id} was deleted")
                assert isinstance(item, Job)
                if item.version <= last_version:
                    continue
                job, last_version = item, item.version
                yield job
        finally:
            watchers = self._watchers[key]
            watchers.discard(queue)
            if not watchers:
                del self._watchers[key]

    async def _listen(self) -> None:
        connection = await asyncpg.connect(
            self._dsn, server_settings={"application_name": "jobs-watch"}
        )
        await connection.add_listener(CHANNEL, self._on_notification)
        connection.add_termination_listener(self._on_listener_lost)
        self._listener = connection

    def _on_notification(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        change = json.loads(payload)
        key = (change["profile_id"], uuid.UUID(change["job_id"]))
        if key in self._watchers:
            self._spawn(self._deliver(key, deleted=change["deleted"]))

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
            for key in list(self._watchers):  # changes may have been missed meanwhile
                self._spawn(self._deliver(key, deleted=False))
            return

    def _spawn(self, coroutine: object) -> None:
        task = asyncio.ensure_future(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, key: WatchKey, *, deleted: bool) -> None:
        profile_id, job_id = key
        item: object = _DELETED
        if not deleted:
            try:
                with profile_scope(profile_id):
                    item = await self._store.get(job_id)
            except NotFound:
                item = _DELETED
            except DomainError as error:
                log.warning("cannot read changed job %s: %s", job_id, error)
                return
        for queue in self._watchers.get(key, ()):
            queue.put_nowait(item)
