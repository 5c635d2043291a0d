"""The attacking profile of tests/test_noisy_neighbours.py, in a process of its own, as a
client on another machine would be: its calls cost the services' event loop nothing but the
serving.

Reads one JSON line from stdin, a list of workers:
`{"target", "method", "payload" (base64 of the serialized request), "metadata", "count",
"streaming" (a server-streaming call left unread until it ends), "channel" (callers sharing
a number share a connection)}`. A payload holding UNIQUE gets a fresh UUID there on every call
(a request_id, a message), the length unchanged, so the bytes stay a valid message.

Each worker repeats its call as soon as it is answered; after a refusal that carries a retry
delay (a google.rpc.RetryInfo in the status details), it waits that long first, as a client
of the suite does (suite_client honours it), and as any client must that wants served.
Prints `launched` once every worker has sent its first call; when stdin closes, prints the
answers counted by status as one JSON line and exits.
"""

import asyncio
import base64
import collections
import json
import sys
import uuid
from collections.abc import Awaitable, Callable

import grpc
import uvloop
from google.rpc import error_details_pb2, status_pb2

UNIQUE = b"00000000-0000-0000-0000-000000000000"


def retry_delay(trailing_metadata: grpc.aio.Metadata | None) -> float:
    """The retry delay a refusal asks for, in seconds; 0 when it names none."""
    for key, value in trailing_metadata or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    return info.retry_delay.ToTimedelta().total_seconds()
    return 0.0


class Attacker:
    def __init__(self, workers: list[dict]) -> None:
        self.workers = workers
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.launched = asyncio.Event()
        self._to_launch = sum(worker["count"] for worker in workers)
        self._channels: dict[tuple[str, int], grpc.aio.Channel] = {}

    def _channel(self, worker: dict) -> grpc.aio.Channel:
        key = (worker["target"], worker.get("channel", 0))
        if key not in self._channels:
            self._channels[key] = grpc.aio.insecure_channel(worker["target"])
        return self._channels[key]

    def _call(self, worker: dict) -> Callable[[], Awaitable[grpc.StatusCode]]:
        payload = base64.b64decode(worker["payload"])
        metadata = tuple(tuple(pair) for pair in worker["metadata"])
        channel = self._channel(worker)

        def request() -> bytes:
            return payload.replace(UNIQUE, str(uuid.uuid4()).encode(), 1)

        if worker.get("streaming"):
            stream = channel.unary_stream(worker["method"])

            async def unread() -> grpc.StatusCode:
                call = stream(request(), metadata=metadata)
                try:
                    code = await call.code()
                finally:
                    call.cancel()
                if delay := retry_delay(await call.trailing_metadata()):
                    await asyncio.sleep(delay)
                return code

            return unread
        unary = channel.unary_unary(worker["method"])

        async def answered() -> grpc.StatusCode:
            try:
                await unary(request(), metadata=metadata)
            except grpc.aio.AioRpcError as error:
                if delay := retry_delay(error.trailing_metadata()):
                    await asyncio.sleep(delay)
                return error.code()
            return grpc.StatusCode.OK

        return answered

    async def _repeat(self, call: Callable[[], Awaitable[grpc.StatusCode]]) -> None:
        pending = asyncio.ensure_future(call())
        await asyncio.sleep(0)  # the call is on its way
        self._to_launch -= 1
        if self._to_launch == 0:
            self.launched.set()
        while True:
            self.outcomes[(await pending).name] += 1
            pending = asyncio.ensure_future(call())

    async def run(self, stop: Awaitable[object]) -> None:
        tasks = [
            asyncio.ensure_future(self._repeat(self._call(worker)))
            for worker in self.workers
            for _ in range(worker["count"])
        ]
        await self.launched.wait()
        print("launched", flush=True)
        await stop
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in self._channels.values():
            await channel.close()


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)  # a payload may be megabytes
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    attacker = Attacker(json.loads(await reader.readline()))
    await attacker.run(reader.read())  # until stdin closes
    print(json.dumps(attacker.outcomes), flush=True)


if __name__ == "__main__":
    uvloop.run(main())
