"""Request and reply fields every servicer converts and checks the same way: text, Structs,
timestamps. Hostile input is refused with INVALID_ARGUMENT naming the field and the limit,
and never reaches the database as something Postgres would refuse (NUL characters, NaN,
year 10000).
"""

import math
from datetime import UTC, datetime
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from services.runtime.errors import InvalidArgument

MAX_STRUCT_BYTES = 1_000_000
MAX_STRUCT_DEPTH = 32
# Timestamp's own range (AIP-142): 0001-01-01 to 9999-12-31.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799


def _python_value(value: struct_pb2.Value, field: str, depth: int, max_depth: int) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        if "\x00" in value.string_value:
            raise InvalidArgument(f"{field} must not contain NUL characters")
        return value.string_value
    if kind == "number_value":
        if not math.isfinite(value.number_value):
            raise InvalidArgument(f"{field} must not hold NaN or infinite numbers")
        return value.number_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _python_struct(value.struct_value, field, depth + 1, max_depth)
    if kind == "list_value":
        if depth + 1 > max_depth:
            raise InvalidArgument(f"{field} is nested deeper than {max_depth} levels")
        return [
            _python_value(item, field, depth + 1, max_depth) for item in value.list_value.values
        ]
    return None  # null_value, or no value at all


def _python_struct(message: struct_pb2.Struct, field: str, depth: int, max_depth: int) -> dict:
    if depth > max_depth:
        raise InvalidArgument(f"{field} is nested deeper than {max_depth} levels")
    converted = {}
    for key, value in message.fields.items():
        if "\x00" in key:
            raise InvalidArgument(f"{field} must not contain NUL characters")
        converted[key] = _python_value(value, field, depth, max_depth)
    return converted


def struct_dict(
    message: struct_pb2.Struct,
    field: str,
    *,
    max_bytes: int = MAX_STRUCT_BYTES,
    max_depth: int = MAX_STRUCT_DEPTH,
) -> dict:
    """The Struct as a dict that JSON and jsonb can hold, as json_format.MessageToDict gives
    it (in one walk that also checks it, at half the cost); InvalidArgument when it is
    larger than max_bytes, nested deeper than max_depth, or holds NUL, NaN or infinity."""
    if message.ByteSize() > max_bytes:
        raise InvalidArgument(f"{field} is larger than {max_bytes} bytes")
    return _python_struct(message, field, 1, max_depth)


def timestamp_datetime(stamp: timestamp_pb2.Timestamp, field: str) -> datetime:
    """An aware datetime; InvalidArgument outside years 1 to 9999 or with bad nanos."""
    if not _MIN_SECONDS <= stamp.seconds <= _MAX_SECONDS or not 0 <= stamp.nanos < 10**9:
        raise InvalidArgument(f"{field} must be a time between years 1 and 9999")
    return stamp.ToDatetime(tzinfo=UTC)


def optional_datetime(message: Message, field: str) -> datetime | None:
    """The named Timestamp field as an aware datetime, or None when it is unset."""
    if not message.HasField(field):
        return None
    return timestamp_datetime(getattr(message, field), field)


def text(value: str, field: str, *, limit: int, required: bool = False) -> str:
    """The string unchanged; InvalidArgument when required and empty, longer than limit
    characters, or holding a NUL character (which Postgres text cannot store)."""
    if required and not value:
        raise InvalidArgument(f"{field} is required")
    if len(value) > limit:
        raise InvalidArgument(f"{field} is longer than {limit} characters")
    if "\x00" in value:
        raise InvalidArgument(f"{field} must not contain NUL characters")
    return value


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp_message(value: datetime) -> timestamp_pb2.Timestamp:
    """An aware datetime as a Timestamp, exact to the microsecond. Integer arithmetic on the
    timedelta: a few times cheaper than Timestamp.FromDatetime, and every reply carries two."""
    since_epoch = value - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=since_epoch.days * 86_400 + since_epoch.seconds,
        nanos=since_epoch.microseconds * 1000,
    )


def struct_message(value: dict) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    if value:  # Struct.update walks the dict in Python even when it is empty
        message.update(value)
    return message
