"""A TCP proxy in front of PostgreSQL that counts what clients send: round trips and
statements, read off the wire protocol, so a figure does not move with the machine.

A round trip is a message the client then waits on: Sync (the end of an extended-protocol
exchange: asyncpg's fetch, execute with arguments), Flush (the server sends what it has so
far: asyncpg's preparing of a statement it does not cache) or Query (simple protocol: execute
without arguments). A statement is an Execute, or one statement of a
Query's text. TLS is refused at the proxy (the client then speaks plain text to it), so the
messages can be read; the proxy is for loopback measurements only.
"""

import asyncio
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit, urlunsplit

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104


@dataclass
class WireCounts:
    round_trips: int = 0
    statements: int = 0

    def __sub__(self, other: "WireCounts") -> "WireCounts":
        return WireCounts(self.round_trips - other.round_trips, self.statements - other.statements)


class WireCounter:
    """Counts, over every connection through the proxy since it started."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        """`upstream_host`: a host, or (starting with /) the folder of the server's socket."""
        self._upstream = (upstream_host, upstream_port)
        self.counts = WireCounts()

    def snapshot(self) -> WireCounts:
        return WireCounts(self.counts.round_trips, self.counts.statements)

    async def _serve(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        try:
            startup = await self._startup(client, to_client)
            if startup is None:
                return
            host, port = self._upstream
            if host.startswith("/"):
                socket_path = f"{host}/.s.PGSQL.{port}"
                server, to_server = await asyncio.open_unix_connection(socket_path)
            else:
                server, to_server = await asyncio.open_connection(host, port)
        except (ConnectionError, asyncio.IncompleteReadError):
            to_client.close()
            return
        to_server.write(startup)
        back = asyncio.ensure_future(_pipe(server, to_client))
        try:
            await self._forward_counted(client, to_server)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            to_server.close()
            await asyncio.gather(back, return_exceptions=True)
            to_client.close()

    async def _startup(
        self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter
    ) -> bytes | None:
        """The client's startup message, once it has given up asking for encryption (which
        the proxy refuses, as a server without TLS does)."""
        while True:
            header = await client.readexactly(4)
            (length,) = struct.unpack("!i", header)
            body = await client.readexactly(length - 4)
            (code,) = struct.unpack("!i", body[:4])
            if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                to_client.write(b"N")
                await to_client.drain()
                continue
            return header + body

    async def _forward_counted(
        self, client: asyncio.StreamReader, to_server: asyncio.StreamWriter
    ) -> None:
        while True:
            header = await client.readexactly(5)
            kind = header[:1]
            (length,) = struct.unpack("!i", header[1:])
            body = await client.readexactly(length - 4)
            if kind in (b"S", b"H"):
                self.counts.round_trips += 1
            elif kind == b"E":
                self.counts.statements += 1
            elif kind == b"Q":
                self.counts.round_trips += 1
                text = body.rstrip(b"\0").decode(errors="replace")
                self.counts.statements += sum(1 for part in text.split(";") if part.strip())
            to_server.write(header + body)
            await to_server.drain()
            if kind == b"X":
                return


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@asynccontextmanager
async def counting_proxy(database_url: str) -> AsyncIterator[tuple[str, WireCounter]]:
    """A proxy to the database of `database_url` on a free loopback port: the URL to connect
    through it instead, and its counter."""
    parts = urlsplit(database_url)
    # A server reached through its socket (the embedded one) names the folder in the query.
    socket_folder = parse_qs(parts.query).get("host", [""])[0]
    counter = WireCounter(socket_folder or parts.hostname or "127.0.0.1", parts.port or 5432)
    server = await asyncio.start_server(counter._serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"
    try:
        yield urlunsplit(parts._replace(netloc=netloc, query="")), counter
    finally:
        server.close()
        await server.wait_closed()
