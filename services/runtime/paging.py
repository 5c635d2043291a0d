"""Pages that fit in one reply (AIP-158 with a byte budget as well as a page size).

A list reply holds as many rows as `page_size` asks, but never more bytes than the reply
budget: what the server may send (GRPC_MAX_MESSAGE_BYTES) less a margin for the reply's other
fields. A page that stops short of `page_size` still carries a `next_page_token`, so a caller
that pages until the token is empty sees every row; it never gets RESOURCE_EXHAUSTED for a
reply the server built too large. A page always holds at least one row: the input limits keep
a single row well below the budget (see tests/test_reply_bounds.py).
"""

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from google.protobuf.message import Message

from services.runtime.page_tokens import KeysetPosition, encode_page_token
from services.runtime.turns import cpu_turn

# Room left in a reply for what is not a row: the next page token (under 200 bytes) and
# anything a later version adds beside the rows.
REPLY_MARGIN_BYTES = 64 * 1024
# The longest a page's conversion holds the event loop before it lets other calls run: a page
# of jobs whose Structs are at their value budget costs far more than this in all.
CONVERSION_SLICE_SECONDS = 0.002

Row = TypeVar("Row")


def reply_budget(max_message_bytes: int) -> int:
    """The bytes a page's rows may take in a reply of at most max_message_bytes."""
    return max(max_message_bytes - REPLY_MARGIN_BYTES, max_message_bytes // 2)


def _varint(value: int) -> bytes:
    """A protobuf varint."""
    encoded = bytearray()
    while value > 0x7F:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


async def encoded_page(
    reply: Message,
    field: str,
    rows: Sequence[Row],
    *,
    more: bool,
    to_message: Callable[[Row], Message],
    position: Callable[[Row], KeysetPosition],
    filters: Any,
    max_bytes: int,
) -> bytes:
    """`reply` encoded, its repeated `field` filled from `rows` (one page's worth at most, in
    list order; `more` says that rows after them match too) and its next_page_token set: a
    servicer returns these bytes as its reply, and the interceptor sends them as they are.

    Rows are converted and encoded one at a time, and added while the field's encoded bytes
    stay within `max_bytes`; the first row is always added. When rows remain, the token
    resumes after the last row added (`position` gives its sort key). The work runs in the
    profile's turn (runtime.turns) and yields to the event loop every
    CONVERSION_SLICE_SECONDS, so a costly page delays another profile's call by no more than
    that at each of its steps. Encoded row by row, a page is never copied or encoded whole in
    one go, which for a page of 4 MB held the loop for 30 ms.
    """
    tag = _varint(reply.DESCRIPTOR.fields_by_name[field].number << 3 | 2)  # length-delimited
    parts: list[bytes] = []
    used = added = 0
    async with cpu_turn():
        slice_ends = time.perf_counter() + CONVERSION_SLICE_SECONDS
        for row in rows:
            if time.perf_counter() > slice_ends:
                await asyncio.sleep(0)
                slice_ends = time.perf_counter() + CONVERSION_SLICE_SECONDS
            encoded = to_message(row).SerializeToString()
            length = _varint(len(encoded))
            cost = len(tag) + len(length) + len(encoded)
            if added and used + cost > max_bytes:
                more = True
                break
            parts += (tag, length, encoded)
            used += cost
            added += 1
        if more and added:
            reply.next_page_token = encode_page_token(position(rows[added - 1]), filters)
        # Fields of a message may come in any order: the rest of the reply, then its rows.
        return b"".join([reply.SerializeToString(), *parts])
