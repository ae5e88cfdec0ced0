"""API keys: Bearer or X-API-Key, constant-time comparison of digests, keys never in repr."""

from __future__ import annotations

import pytest

from rmserve.model.errors import UnauthorizedError
from rmserve.serve.edge.auth import ApiKeyAuth


def test_disabled_without_keys():
    auth = ApiKeyAuth([])
    assert not auth.enabled
    auth.check({})  # no exception


@pytest.mark.parametrize(
    "headers",
    [{"authorization": "Bearer k2"}, {"authorization": "bearer  k1 "}, {"x-api-key": "k1"}],
)
def test_valid_keys_pass(headers):
    ApiKeyAuth(["k1", "k2"]).check(headers)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing API key"),
        ({"authorization": "Basic azE="}, "missing API key"),
        ({"authorization": "Bearer "}, "missing API key"),
        ({"authorization": "Bearer k3"}, "invalid API key"),
        ({"x-api-key": "k1x"}, "invalid API key"),
    ],
)
def test_missing_or_wrong_keys_are_401(headers, message):
    with pytest.raises(UnauthorizedError, match=message) as info:
        ApiKeyAuth(["k1", "k2"]).check(headers)
    assert info.value.status == 401


def test_keys_are_not_in_repr():
    assert "k1" not in repr(ApiKeyAuth(["k1"]))
