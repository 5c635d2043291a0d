"""Page tokens carry a row's sort key exactly: a position off by a microsecond would skip or
repeat rows at a page boundary."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from services.runtime.call_context import profile_scope
from services.runtime.errors import InvalidArgument
from services.runtime.page_tokens import decode_page_token, encode_page_token, page_size

TIMES = [
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(2026, 11, 25, 10, 47, 1, 999_999, tzinfo=UTC),
    datetime(7109, 4, 23, 17, 47, 31, 79_711, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
]


@pytest.mark.parametrize("moment", TIMES, ids=str)
def test_a_position_round_trips_to_the_microsecond(moment):
    position = (moment, uuid.uuid4())
    with profile_scope("p"):
        assert decode_page_token(encode_page_token(position, ["f"]), ["f"]) == position


def test_microseconds_survive_where_a_float_of_seconds_would_round():
    moment = datetime(7109, 4, 23, 17, 47, 31, 79_711, tzinfo=UTC)
    seconds = (moment - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(seconds=1)
    assert datetime.fromtimestamp(seconds, UTC) != moment  # why the token keeps integers
    with profile_scope("p"):
        decoded, _ = decode_page_token(encode_page_token((moment, uuid.uuid4()), []), [])
    assert decoded == moment


@pytest.mark.parametrize(("requested", "expected"), [(0, 50), (1, 1), (500, 500), (501, 500)])
def test_page_size_defaults_and_caps(requested, expected):
    assert page_size(requested) == expected


def test_negative_page_size_is_refused():
    with pytest.raises(InvalidArgument, match="page_size"):
        page_size(-1)
