"""Hostile input for any gRPC service of the suite: hypothesis strategies that build random
request messages from their proto descriptors, and the check every reply must pass.

A service's fuzz test names its stub, its requests' plausible values (so that some calls get
past validation) and its database schema; everything else here is generic.
"""

import asyncio
import logging
import os
import string
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg
import grpc
from google.protobuf import descriptor, struct_pb2
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import new_profile_id

# Fast enough for `make test` on a shared 2-core machine; raise it locally to dig deeper:
# HYPOTHESIS_PROFILE=deep make test
settings.register_profile(
    "default",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("deep", parent=settings.get_profile("default"), max_examples=1000)
# CI replays the same examples every run, so a red run is a regression, not a new draw.
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "default")
)

# Statuses a service answers on purpose. UNKNOWN, INTERNAL, DATA_LOSS or UNIMPLEMENTED mean a
# crash or a gap; UNAVAILABLE is deliberate only where a third party is called.
DELIBERATE = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)

SQL_FRAGMENTS = [
    "'; DROP TABLE jobs.jobs; --",
    "' OR '1'='1",
    "x'); SELECT pg_sleep(10); --",
    "$1",
    "%s%s%s",
    "\\x00",
    "set_config('app.profile_id', 'other', true)",
    "*",
    "../../etc/passwd",
]
CONTROL = "".join(chr(c) for c in range(32)) + "\x7f\u2028\u202e\ufeff"

hostile_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=CONTROL, max_size=20),
    st.sampled_from(SQL_FRAGMENTS),
    st.integers(min_value=1_000, max_value=300_000).map(lambda n: "x" * n),
    st.integers(min_value=1, max_value=3).map(lambda n: "\x00" * n),
)

_INTS = {
    descriptor.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    descriptor.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    descriptor.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    descriptor.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    descriptor.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    descriptor.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}


def _ints(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (0, 1, -1, 50, 100, 101, 500, 501, low, high) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def _nested(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = {"n": leaf} if depth % 2 else [leaf]
    return leaf


_json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 2**53 + 1, 5e-324]),
    hostile_text,
)
json_values = st.recursive(
    _json_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(hostile_text, children, max_size=4)
    ),
    max_leaves=12,
)


def _struct(value: dict) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


structs = st.one_of(
    st.dictionaries(hostile_text, json_values, max_size=5),
    st.integers(1, 80).map(lambda depth: {"deep": _nested(depth, "leaf")}),
    st.integers(100, 3_000).map(lambda n: {f"k{i}": i for i in range(n)}),
    st.just({"big": "x" * 1_100_000}),
).map(_struct)

timestamps = st.fixed_dictionaries(
    {
        "seconds": st.one_of(
            _ints(-(2**63), 2**63 - 1),
            st.integers(-62_135_596_800, 253_402_300_799),
            st.sampled_from([0, 1_700_000_000, 4_102_444_800]),
        ),
        "nanos": _ints(-(2**31), 2**31 - 1),
    }
)

# gRPC metadata values are printable ASCII; anything else never leaves the client.
metadata_text = st.text(alphabet=string.printable.strip() + " ", max_size=80)
profile_ids = st.one_of(
    st.builds(new_profile_id),
    st.builds(new_profile_id),
    metadata_text,
    st.sampled_from(["", "*", "-x", "a" * 65, "store-1' OR '1'='1"]),
)
extra_metadata = st.lists(
    st.tuples(st.sampled_from(["x-request-id", "x-trace", "user-agent-x"]), metadata_text),
    max_size=2,
)

Plausible = Mapping[str, st.SearchStrategy[Any]]


def _scalar(field: descriptor.FieldDescriptor, plausible: Plausible) -> st.SearchStrategy[Any]:
    types = descriptor.FieldDescriptor
    if field.type == types.TYPE_STRING:
        base = hostile_text
    elif field.type == types.TYPE_BYTES:
        base = st.binary(max_size=2_000)
    elif field.type == types.TYPE_BOOL:
        base = st.booleans()
    elif field.type in (types.TYPE_DOUBLE, types.TYPE_FLOAT):
        base = st.floats(width=32 if field.type == types.TYPE_FLOAT else 64)
    elif field.type == types.TYPE_ENUM:
        numbers = [value.number for value in field.enum_type.values]
        base = st.sampled_from([*numbers, max(numbers) + 1, 999])
    else:
        base = _ints(*_INTS[field.type])
    if field.name in plausible:
        return st.one_of(plausible[field.name], plausible[field.name], base)
    return base


def _field(
    field: descriptor.FieldDescriptor, plausible: Plausible, depth: int
) -> st.SearchStrategy[Any]:
    if field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name.values()
            return st.dictionaries(
                _scalar(key, plausible), _field(value, plausible, depth + 1), max_size=3
            )
        one = messages(field.message_type._concrete_class, plausible, depth + 1)
    else:
        one = _scalar(field, plausible)
    if field.is_repeated:
        return st.lists(one, max_size=4)
    return one


def _build(message_class: type[Message], values: dict[str, Any]) -> Message:
    message = message_class()
    for name, value in values.items():
        field = message_class.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                for key, item in value.items():
                    target[key].CopyFrom(item)
            elif field.is_repeated:
                for item in value:
                    target.add().CopyFrom(item)
            else:
                target.CopyFrom(value)
        elif field.is_repeated:
            target.extend(value)
        else:
            setattr(message, name, value)
    return message


def messages(
    message_class: type[Message], plausible: Plausible | None = None, depth: int = 0
) -> st.SearchStrategy[Message]:
    """Random instances of a request message: every field unset, plausible or hostile.

    `plausible` maps field names (at any depth) to values that pass validation, so that some
    calls reach the store and Postiz; the rest probe the limits.
    """
    plausible = plausible or {}
    name = message_class.DESCRIPTOR.full_name
    if name == "google.protobuf.Struct":
        return structs
    if name == "google.protobuf.Timestamp":
        return timestamps.map(lambda values: message_class(**values))
    if name == "google.protobuf.FieldMask":
        paths = plausible.get("paths", hostile_text)
        return st.lists(st.one_of(paths, hostile_text), max_size=4).map(
            lambda p: message_class(paths=p)
        )
    if depth > 3:
        return st.just(message_class())
    fields = {f.name: _field(f, plausible, depth) for f in message_class.DESCRIPTOR.fields}
    return st.fixed_dictionaries({}, optional=fields).map(
        lambda values: _build(message_class, values)
    )


async def call_status(
    stub: Any,
    method: descriptor.MethodDescriptor,
    request: Any,
    metadata: tuple[tuple[str, str], ...],
    deadline_seconds: float = 5,
) -> tuple[grpc.StatusCode, str]:
    """Calls one RPC of any shape; the status it ends with and its details."""
    call_method = getattr(stub, method.name)
    try:
        if method.client_streaming:
            call = call_method(iter(request), metadata=metadata, timeout=deadline_seconds)
        else:
            call = call_method(request, metadata=metadata, timeout=deadline_seconds)
        if method.server_streaming:
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


async def profile_rows(
    connection: asyncpg.Connection, schema: str, profile_id: str
) -> dict[str, str | None]:
    """A digest of every row the profile has in the schema's tables (those with profile_id)."""
    tables = await connection.fetch(
        """
        SELECT table_name FROM information_schema.columns
        WHERE table_schema = $1 AND column_name = 'profile_id' ORDER BY table_name
        """,
        schema,
    )
    digests = {}
    for table in tables:
        name = f"{schema}.{table['table_name']}"
        digests[name] = await connection.fetchval(
            f"SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {name} t "
            "WHERE profile_id = $1",
            profile_id,
        )
    return digests


async def run_property(
    check: Callable[..., Awaitable[None]], **strategies: st.SearchStrategy[Any]
) -> None:
    """Runs an async property with hypothesis from inside the running event loop: hypothesis
    drives it from a thread, each example runs on the loop (where the services' channels
    live)."""
    loop = asyncio.get_running_loop()

    @given(**strategies)
    def example(**values: Any) -> None:
        asyncio.run_coroutine_threadsafe(check(**values), loop).result()

    await asyncio.to_thread(example)


# What a grpc.aio client reports when it loses the server's status: a server that ends a
# client-streaming call before the client has sent every message (a refusal, say) sends its
# status, and the client's next write fails and overwrites it (grpc/grpc#36066).
CLIENT_LOST_THE_STATUS = "Internal error from Core"


class AccessLines(logging.Handler):
    """The services' access lines (logger services.access) while it is installed: the
    status each call ended with on the server."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "AccessLines":
        logging.getLogger("services.access").addHandler(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        logging.getLogger("services.access").removeHandler(self)

    def server_status(self, since: int, method: str) -> grpc.StatusCode:
        """The status the last call of `method` logged after record number `since` ended
        with on the server."""
        statuses = [r.status for r in self.records[since:] if getattr(r, "method", "") == method]
        assert statuses, f"the server logged no call of {method}"
        return grpc.StatusCode[statuses[-1]]
