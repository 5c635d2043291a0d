"""Which Postiz base URLs a profile may set."""

import pytest

from services.publisher.model import normalised_base_url
from services.runtime.errors import InvalidArgument


def test_base_url_loses_its_trailing_slash():
    assert normalised_base_url("https://api.postiz.com/public/v1/") == (
        "https://api.postiz.com/public/v1"
    )


def test_base_url_on_an_allowed_host_is_accepted():
    allowed = frozenset({"api.postiz.com"})
    assert normalised_base_url("https://api.postiz.com/public/v1", allowed)


def test_base_url_on_a_host_not_allowed_is_invalid():
    with pytest.raises(InvalidArgument, match="not an allowed Postiz host"):
        normalised_base_url("http://10.0.0.5/public/v1", frozenset({"api.postiz.com"}))
