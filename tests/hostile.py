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
CONTROL = "".join(chr(c) for c in range(32)) + "\x7f\x85\x9f\u2028\u202e\ufeff"


def with_control(text: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Strings of `text` with one control (or otherwise odd) character somewhere inside."""
    return st.tuples(text, st.sampled_from(CONTROL), st.integers(0, 40)).map(
        lambda parts: parts[0][: parts[2]] + parts[1] + parts[0][parts[2] :]
    )


hostile_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=CONTROL, max_size=20),
    with_control(st.text(alphabet=string.ascii_letters + " ", max_size=20)),
    st.sampled_from(SQL_FRAGMENTS),
    st.integers(min_value=1_000, max_value=300_000).map(lambda n: "x" * n),
    st.integers(min_value=1, max_value=3).map(lambda n: "\x00" * n),
)

# Money and quantities: the longest kept exactly, one digit past it on either side of the
# point, notations Decimal() reads but the wire does not take, and random ones.
LONGEST_DECIMAL = "999999999999999.999999999999999999"
hostile_decimals = st.one_of(
    st.sampled_from(
        [
            LONGEST_DECIMAL,
            LONGEST_DECIMAL + "9",
            "9" + LONGEST_DECIMAL,
            "1" + "0" * 15,
            "0." + "0" * 18 + "1",
            "1e15",
            "1E-7",
            "12.5" + "0" * 40,
            "0e999999999",
            "1e99999999999999999999",
            "1_000",
            "\u0661\u0662",
            "NaN",
            "-Infinity",
            "-0",
            " 7 ",
        ]
    ),
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.integers(1, 80).map(lambda n: "9" * n),
    st.integers(1, 40).map(lambda n: "0." + "0" * n + "1"),
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


# Node-heavy Structs: around each budget on values (100, 1,000, 5,000), and far above it.
_VALUE_COUNTS = [99, 100, 101, 999, 1_000, 1_001, 4_999, 5_000, 5_001, 20_000]

structs = st.one_of(
    st.dictionaries(hostile_text, json_values, max_size=5),
    st.integers(1, 80).map(lambda depth: {"deep": _nested(depth, "leaf")}),
    st.integers(100, 3_000).map(lambda n: {f"k{i}": i for i in range(n)}),
    st.sampled_from(_VALUE_COUNTS).map(lambda n: {"l": [[] for _ in range(n - 1)]}),
    st.just({"big": "x" * 1_100_000}),
).map(_struct)

_FIRST_SECOND = -62_135_596_800  # 0001-01-01T00:00:00Z
_LAST_SECOND = 253_402_300_799  # 9999-12-31T23:59:59Z
timestamps = st.one_of(
    st.fixed_dictionaries(
        {
            "seconds": st.one_of(
                _ints(-(2**63), 2**63 - 1),
                st.integers(_FIRST_SECOND, _LAST_SECOND),
                st.sampled_from([0, 1_700_000_000, 4_102_444_800]),
            ),
            "nanos": _ints(-(2**31), 2**31 - 1),
        }
    ),
    # Either end of the range, exactly, and the last day and month before the end.
    st.fixed_dictionaries(
        {
            "seconds": st.sampled_from(
                [
                    _FIRST_SECOND,
                    _FIRST_SECOND + 1,
                    _LAST_SECOND,
                    _LAST_SECOND - 86_400,
                    _LAST_SECOND - 40 * 86_400,
                ]
            ),
            "nanos": st.sampled_from([0, 999_999_999]),
        }
    ),
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
        near_plausible = base
        if field.type == types.TYPE_STRING:  # one odd character in an otherwise good value
            near_plausible = st.one_of(base, with_control(plausible[field.name]))
        return st.one_of(plausible[field.name], plausible[field.name], near_plausible)
    return base


# Counts just past each repeated field's maximum (5 statuses, 6 group_by or update paths,
# 10 thresholds, values or media, 20 posts, tags or integrations, 500 lines).
_LONG_COUNTS = [6, 7, 11, 21, 501]


def _empty(field: descriptor.FieldDescriptor) -> Any:
    """The cheapest entry of a field's type: many copies of it stay a small message."""
    if field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
        return field.message_type._concrete_class()
    if field.type == descriptor.FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values[-1].number
    types = descriptor.FieldDescriptor
    return {types.TYPE_STRING: "", types.TYPE_BYTES: b"", types.TYPE_BOOL: False}.get(field.type, 0)


def _long(field: descriptor.FieldDescriptor, one: st.SearchStrategy[Any]) -> st.SearchStrategy:
    """A repeated field over its maximum count: copies of one drawn entry while that stays
    small, of an empty entry beyond."""
    return st.tuples(one, st.sampled_from(_LONG_COUNTS)).map(
        lambda drawn: [drawn[0] if drawn[1] <= 25 else _empty(field)] * drawn[1]
    )


def _field(
    field: descriptor.FieldDescriptor, plausible: Plausible, depth: int
) -> st.SearchStrategy[Any]:
    if field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name.values()
            small = st.dictionaries(
                _scalar(key, plausible), _field(value, plausible, depth + 1), max_size=3
            )
            if key.type != descriptor.FieldDescriptor.TYPE_STRING:
                return small
            many = st.sampled_from([21, 25]).map(
                lambda n: {f"key-{i}": _empty(value) for i in range(n)}
            )
            return st.one_of(small, small, many)
        one = messages(field.message_type._concrete_class, plausible, depth + 1)
    else:
        one = _scalar(field, plausible)
    if field.is_repeated:
        return st.one_of(st.lists(one, max_size=4), st.lists(one, max_size=4), _long(field, one))
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
