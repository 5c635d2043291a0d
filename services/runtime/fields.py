"""Request and reply fields every servicer converts and checks the same way: text, Structs,
timestamps, repeated fields. Hostile input is refused with INVALID_ARGUMENT naming the field
and the limit, and never reaches the database as something Postgres would refuse (NUL
characters, NaN, year 10000). Every check costs at most what the limit allows, so one call
cannot spend seconds of CPU converting a request that then turns out to be too large.
"""

import math
import re
from collections.abc import Sized
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from services.runtime.errors import InvalidArgument

MAX_STRUCT_BYTES = 1_000_000
MAX_STRUCT_DEPTH = 32
# Every value a Struct holds counts, containers included: a list of 240,000 empty lists is
# under 1 MB on the wire yet costs seconds to convert, so bytes alone do not bound the work.
# A pipeline job's inputs (a product, a script, a few dozen scenes) hold tens to hundreds of
# values; 5,000 is ten times a rich payload, and converting it costs a few milliseconds of
# CPU (one to two microseconds a value), where 240,000 would cost half a second.
MAX_STRUCT_VALUES = 5_000

# Characters refused in text. NUL everywhere: Postgres text and jsonb cannot hold it. Free
# text (a message, a post's content, a Struct's strings) may also hold tab, line feed and
# carriage return, and refuses the other C0 controls; a name or identifier (request_id,
# kind, model, an id, a URL, a tag) is one line and refuses every control character (C0,
# DEL and C1, Unicode category Cc).
_FREE_TEXT_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")
_NAME_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")

# Timestamp's own range (AIP-142): 0001-01-01 to 9999-12-31.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799
_Repeated = TypeVar("_Repeated", bound=Sized)
MIN_TIME = datetime.min.replace(tzinfo=UTC)
MAX_TIME = datetime.max.replace(tzinfo=UTC)


def _check_controls(value: str, field: str, controls: re.Pattern[str], allowed: str) -> None:
    if value.isprintable():  # the common case, checked in C without a regular expression
        return
    found = controls.search(value)
    if found is None:
        return
    if found.group() == "\x00":
        raise InvalidArgument(f"{field} must not contain NUL characters")
    raise InvalidArgument(
        f"{field} must not contain control characters{allowed}, got U+{ord(found.group()):04X}"
    )


def without_controls(value: str) -> str:
    """The string with each control character free text may not hold replaced by a space:
    for a field that is only a preview, where refusing the call would lose more."""
    return _FREE_TEXT_CONTROLS.sub(" ", value)


def _check_free_text(value: str, field: str) -> None:
    _check_controls(
        value, field, _FREE_TEXT_CONTROLS, " other than tab, line feed and carriage return"
    )


class _StructWalk:
    """One Struct converted to a dict, counting values and depth as it goes, so that a
    Struct over its budget is refused after at most max_values values are looked at."""

    def __init__(self, field: str, max_values: int, max_depth: int) -> None:
        self.field = field
        self.max_depth = max_depth
        self.values_left = max_values
        self.max_values = max_values

    def _deeper(self, depth: int) -> None:
        if depth > self.max_depth:
            raise InvalidArgument(f"{self.field} is nested deeper than {self.max_depth} levels")

    def value(self, value: struct_pb2.Value, depth: int) -> Any:
        self.values_left -= 1
        if self.values_left < 0:
            raise InvalidArgument(f"{self.field} holds more than {self.max_values} values")
        kind = value.WhichOneof("kind")
        if kind == "string_value":
            string = value.string_value
            if not string.isprintable():
                _check_free_text(string, self.field)
            return string
        if kind == "number_value":
            number = value.number_value
            if not math.isfinite(number):
                raise InvalidArgument(f"{self.field} must not hold NaN or infinite numbers")
            return number
        if kind == "bool_value":
            return value.bool_value
        if kind == "struct_value":
            return self.struct(value.struct_value, depth + 1)
        if kind == "list_value":
            self._deeper(depth + 1)
            return [self.value(item, depth + 1) for item in value.list_value.values]
        return None  # null_value, or no value at all

    def struct(self, message: struct_pb2.Struct, depth: int) -> dict:
        self._deeper(depth)
        fields = message.fields
        converted = {}
        # Keys, then a lookup each: twice as fast as items() on protobuf's map.
        for key in fields:
            if not key.isprintable():
                _check_free_text(key, self.field)
            converted[key] = self.value(fields[key], depth)
        return converted


def struct_dict(
    message: struct_pb2.Struct,
    field: str,
    *,
    max_values: int = MAX_STRUCT_VALUES,
    max_bytes: int = MAX_STRUCT_BYTES,
    max_depth: int = MAX_STRUCT_DEPTH,
) -> dict:
    """The Struct as a dict that JSON and jsonb can hold, as json_format.MessageToDict gives
    it (in one walk that also checks it, at half the cost); InvalidArgument when it holds
    more than max_values values, is nested deeper than max_depth, is larger than max_bytes,
    or holds NaN, infinity, or control characters that free text may not hold.

    The walk comes first and stops at the budget; the size in bytes is measured after it,
    on a Struct whose number of values is then known to be small."""
    converted = _StructWalk(field, max_values, max_depth).struct(message, 1)
    if message.ByteSize() > max_bytes:
        raise InvalidArgument(f"{field} is larger than {max_bytes} bytes")
    return converted


def at_most(values: _Repeated, field: str, limit: int) -> _Repeated:
    """The repeated field unchanged; InvalidArgument when it holds more than limit entries.
    Checked before any entry is converted."""
    if len(values) > limit:
        raise InvalidArgument(f"{field} holds more than {limit} entries ({len(values)})")
    return values


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


def shifted_time(moment: datetime, delta: timedelta) -> datetime:
    """moment + delta, held within years 1 to 9999: a window around a time a caller gave may
    reach past either end of the range, where datetime arithmetic overflows."""
    if delta >= timedelta(0):
        return moment + delta if MAX_TIME - moment > delta else MAX_TIME
    return moment + delta if moment - MIN_TIME > -delta else MIN_TIME


def text(
    value: str, field: str, *, limit: int, required: bool = False, free_text: bool = False
) -> str:
    """The string unchanged; InvalidArgument when required and empty, longer than limit
    characters, or holding a NUL character (which Postgres text cannot store) or another
    control character: any in a name or identifier, all but tab, line feed and carriage
    return in free text."""
    if required and not value:
        raise InvalidArgument(f"{field} is required")
    if len(value) > limit:
        raise InvalidArgument(f"{field} is longer than {limit} characters")
    if free_text:
        _check_free_text(value, field)
    else:
        _check_controls(value, field, _NAME_CONTROLS, "")
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
