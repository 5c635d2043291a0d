"""A Postiz that dribbles: it confirms any API key at once (`GET /is-connected`), then answers
every other request with headers and a body sent one byte at a time, a byte every
`interval` seconds, never finishing. No read timeout ever fires on it; only a limit on a
request's total time does.

Served on a loopback address of its own (127.0.0.2 by default), so that it is another host
than the fake Postiz of services/publisher/fake_postiz.py (127.0.0.1).
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from services.publisher.fake_postiz import PREFIX

_CONNECTED = b'{"connected":true}'
_PROMISED_BYTES = 1_000_000


@dataclass
class SlowPostiz:
    base_url: str
    interval: float
    dribbling: int = 0  # requests being dribbled now
    most_dribbling: int = 0  # the most at once
    requests: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def api_root(self) -> str:
        return self.base_url + PREFIX

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                self.requests += 1
                path = head.split(b" ", 2)[1]
                if path.endswith(b"/is-connected"):
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(_CONNECTED), _CONNECTED)
                    )
                    await writer.drain()
                    continue
                await self._dribble(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
            writer.close()

    async def _dribble(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Sends a byte every interval until the client hangs up (noticed at once)."""
        self.dribbling += 1
        self.most_dribbling = max(self.most_dribbling, self.dribbling)
        try:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n[" % _PROMISED_BYTES
            )
            while True:
                await writer.drain()
                try:
                    if not await asyncio.wait_for(reader.read(1), self.interval):
                        return  # the client closed the connection
                except TimeoutError:
                    writer.write(b" ")
        finally:
            self.dribbling -= 1


@asynccontextmanager
async def serve_slow_postiz(
    host: str = "127.0.0.2", interval: float = 1.5
) -> AsyncIterator[SlowPostiz]:
    """The dribbling Postiz on an ephemeral port of `host` until the block ends."""
    slow = SlowPostiz(base_url="", interval=interval)
    server = await asyncio.start_server(slow._serve, host, 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    slow.base_url = f"http://{host}:{port}"
    try:
        yield slow
    finally:
        server.close()
        for task in list(slow._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*slow._tasks, return_exceptions=True)
        await server.wait_closed()
