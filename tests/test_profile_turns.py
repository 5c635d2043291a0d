"""Each profile's turn at the event loop (runtime.turns): a profile's costly sections run one
at a time, while another profile's run beside them; what a call needs no turn for is never
held up by one."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc

from services.runtime.interceptors import ProfileInterceptor
from services.runtime.turns import cpu_turn
from tests.conftest import as_profile, serving_test_service

COSTLY = "/test.Service/Costly"
SHARED = "/test.Service/Shared"


@dataclass
class Sections:
    """Costly sections that log who runs them. A "busy" section lasts until a "quiet" one
    has begun: one that waited for the busy profile's turn would never begin."""

    running: dict[str, int] = field(default_factory=dict)
    most: dict[str, int] = field(default_factory=dict)
    busy_running_as_quiet_began: int = 0
    quiet_began: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Queue[str] = field(default_factory=asyncio.Queue)

    async def costly(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        profile = request.decode()
        async with cpu_turn():
            self.running[profile] = self.running.get(profile, 0) + 1
            self.most[profile] = max(self.most.get(profile, 0), self.running[profile])
            self.started.put_nowait(profile)
            if profile == "quiet":
                self.busy_running_as_quiet_began = self.running.get("busy", 0)
                self.quiet_began.set()
            else:
                await asyncio.wait_for(self.quiet_began.wait(), 10)
            self.running[profile] -= 1
        return request


class SharedReply:
    """One reply object sent on every stream, its encodings counted."""

    def __init__(self) -> None:
        self.reply = object()
        self.encoded = 0

    def encode(self, reply: object) -> bytes:
        self.encoded += 1
        return b"shared"

    async def stream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator:
        yield self.reply


@asynccontextmanager
async def serving(sections: Sections, shared: SharedReply):
    interceptor = ProfileInterceptor()
    methods = {
        "Costly": grpc.unary_unary_rpc_method_handler(sections.costly),
        "Shared": grpc.unary_stream_rpc_method_handler(
            shared.stream, response_serializer=shared.encode
        ),
    }
    async with serving_test_service(interceptor, methods) as channel:
        yield channel, interceptor


async def test_a_profiles_costly_sections_take_turns_while_another_profiles_run_beside():
    sections = Sections()
    async with serving(sections, SharedReply()) as (channel, interceptor):
        costly = channel.unary_unary(COSTLY)
        busy = [costly(b"busy", metadata=as_profile("busy")) for _ in range(4)]
        assert await sections.started.get() == "busy"
        quiet = costly(b"quiet", metadata=as_profile("quiet"))
        assert await asyncio.gather(*busy, quiet) == [b"busy"] * 4 + [b"quiet"]
        assert interceptor.turns.profiles() == 0  # entries go with the calls
    # The busy profile's four calls ran their sections one at a time...
    assert sections.most == {"busy": 1, "quiet": 1}
    # ...and the quiet profile's began while one of them ran, not after.
    assert sections.busy_running_as_quiet_began == 1


async def test_one_reply_sent_on_many_streams_is_encoded_once():
    shared = SharedReply()
    async with serving(Sections(), shared) as (channel, _):
        stream = channel.unary_stream(SHARED)
        for profile in ("p1", "p2", "p1"):
            assert [reply async for reply in stream(b"", metadata=as_profile(profile))] == [
                b"shared"
            ]
    assert shared.encoded == 1
