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
    [
        {"authorization": "Bearer k2"},
        {"authorization": "bearer  k1 "},
        {"x-api-key": "k1"},
        {"authorization": "Basic cm1zZXJ2ZTprMg=="},  # rmserve:k2 (a URL http://rmserve:k2@host)
        {"authorization": "basic azE6"},  # k1: (a URL http://k1@host)
    ],
)
def test_valid_keys_pass(headers):
    ApiKeyAuth(["k1", "k2"]).check(headers)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing API key"),
        ({"authorization": "Basic azE="}, "missing API key"),  # k1, not user:password
        ({"authorization": "Basic not base64!"}, "missing API key"),
        ({"authorization": "Basic cm1zZXJ2ZTo="}, "invalid API key"),  # rmserve: (a user name, no key)
        ({"authorization": "Basic azE6azM="}, "invalid API key"),  # k1:k3 (the password is the key)
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
