"""Retry behaviour of both clients, table-style: status sequence -> attempts, requested sleeps, outcome."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import pytest
from client_fakes import Sleeps, call, make_client

from rmserve.client import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    GatewayTimeoutError,
    InternalServerError,
    InvalidRequestError,
    NotReadyError,
    OverloadedError,
    RequestTooLargeError,
    UnauthorizedError,
)
from rmserve.client._retry import backoff_delay, is_retryable_status, parse_retry_after

TYPES = {
    400: "invalid_request",
    401: "unauthorized",
    404: None,
    408: None,
    413: "request_too_large",
    422: "invalid_request",
    429: "overloaded",
    500: "internal",
    502: None,
    503: "not_ready",
    504: "timeout",
}


def scripted(steps: list):
    """A handler that answers the n-th attempt with ``steps[n]``: a status, (status, headers), or an exception."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        step = steps[len(seen)]
        seen.append(request)
        if isinstance(step, Exception):
            raise step
        status, headers = step if isinstance(step, tuple) else (step, {})
        if status == 200:
            return httpx.Response(200, json={"model": "m", "rewards": [0.25], "truncated": [], "usage": {}})
        error = {"message": f"failed with {status}", "type": TYPES.get(status), "code": status, "param": None}
        return httpx.Response(status, json={"error": error}, headers=headers)

    return handler, seen


CONNECT = httpx.ConnectError("connection refused")
READ_TIMEOUT = httpx.ReadTimeout("read timed out")
# rng() is fixed at 0.5, so every backoff is its base times (1 - 0.25 * 0.5) = 0.875.
B0, B1, B2 = 0.5 * 0.875, 1.0 * 0.875, 2.0 * 0.875

TABLE = [
    # (id, steps, client max_retries, expected attempts, expected sleeps, outcome: None = success, else class)
    ("ok", [200], 3, 1, [], None),
    ("500-then-ok", [500, 200], 3, 2, [B0], None),
    ("502-503-then-ok", [502, 503, 200], 3, 3, [B0, B1], None),
    ("408-then-ok", [408, 200], 3, 2, [B0], None),
    ("504-twice-then-ok", [504, 504, 200], 3, 3, [B0, B1], None),
    ("500-exhausted", [500] * 4, 3, 4, [B0, B1, B2], InternalServerError),
    ("503-exhausted", [503] * 3, 2, 3, [B0, B1], NotReadyError),
    ("504-exhausted", [504] * 2, 1, 2, [B0], GatewayTimeoutError),
    ("429-retry-after", [(429, {"Retry-After": "2"}), 200], 3, 2, [2.0 * 1.125], None),  # + jitter, never less
    ("429-retry-after-capped", [(429, {"Retry-After": "3600"}), 200], 3, 2, [60.0], None),
    ("429-bad-retry-after", [(429, {"Retry-After": "soon"}), 200], 3, 2, [B0], None),
    ("429-no-header", [429, 429, 200], 3, 3, [B0, B1], None),
    ("429-exhausted", [(429, {"Retry-After": "1"})] * 2, 1, 2, [1.125], OverloadedError),
    ("503-retry-after", [(503, {"Retry-After": "7"}), 200], 3, 2, [7.0 * 1.125], None),
    ("400-not-retried", [400, 200], 3, 1, [], InvalidRequestError),
    ("401-not-retried", [401, 200], 3, 1, [], UnauthorizedError),
    ("404-not-retried", [404, 200], 3, 1, [], APIStatusError),
    ("413-not-retried", [413, 200], 3, 1, [], RequestTooLargeError),
    ("422-not-retried", [422, 200], 3, 1, [], InvalidRequestError),
    ("no-retries", [500, 200], 0, 1, [], InternalServerError),
    ("connect-error-then-ok", [CONNECT, 200], 3, 2, [B0], None),
    ("connect-error-exhausted", [CONNECT] * 3, 2, 3, [B0, B1], APIConnectionError),
    ("timeout-exhausted", [READ_TIMEOUT] * 2, 1, 2, [B0], APITimeoutError),
    ("mixed", [CONNECT, 429, 500, 200], 3, 4, [B0, B1, B2], None),
]


@pytest.mark.parametrize(
    ("steps", "max_retries", "attempts", "sleeps", "outcome"), [row[1:] for row in TABLE], ids=[row[0] for row in TABLE]
)
def test_retry_table(mode, steps, max_retries, attempts, sleeps, outcome):
    handler, seen = scripted(steps)
    recorded = Sleeps()
    client = make_client(mode, handler, sleeps=recorded, max_retries=max_retries)
    if outcome is None:
        assert call(client, "score", ["p"], ["r"]) == [0.25]
    else:
        with pytest.raises(outcome) as info:
            call(client, "score", ["p"], ["r"])
        assert type(info.value) is outcome  # the exact class, not only a base class
    assert len(seen) == attempts
    assert recorded == pytest.approx(sleeps)
    # A retry resends the very same request.
    assert len({(r.method, str(r.url), r.content) for r in seen}) == 1


def test_per_call_max_retries_overrides_the_client(mode):
    handler, seen = scripted([500, 500, 200])
    client = make_client(mode, handler, max_retries=0)
    assert call(client, "score", ["p"], ["r"], max_retries=2) == [0.25]
    assert len(seen) == 3

    handler, seen = scripted([500, 200])
    client = make_client(mode, handler, max_retries=5)
    with pytest.raises(InternalServerError):
        call(client, "score", ["p"], ["r"], max_retries=0)
    assert len(seen) == 1


def test_negative_max_retries_is_rejected(mode):
    handler, _ = scripted([200])
    with pytest.raises(ValueError, match="max_retries"):
        call(make_client(mode, handler), "score", ["p"], ["r"], max_retries=-1)
    with pytest.raises(ValueError, match="max_retries"):
        make_client(mode, handler, max_retries=-1)


def test_retry_after_as_http_date_is_honoured(mode):
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    handler, seen = scripted([(429, {"Retry-After": when}), 200])
    recorded = Sleeps()
    assert call(make_client(mode, handler, sleeps=recorded), "score", ["p"], ["r"]) == [0.25]
    assert len(recorded) == 1 and 27.0 <= recorded[0] <= 30.0 * 1.25


def test_connection_error_keeps_its_cause_and_request(mode):
    handler, _ = scripted([CONNECT] * 2)
    with pytest.raises(APIConnectionError) as info:
        call(make_client(mode, handler, max_retries=1), "score", ["p"], ["r"])
    assert not isinstance(info.value, APITimeoutError)
    assert info.value.__cause__ is CONNECT
    assert info.value.request is not None and info.value.request.url.path == "/v1/score"
    assert "connection refused" in str(info.value)


def test_overloaded_error_carries_retry_after(mode):
    handler, _ = scripted([(429, {"Retry-After": "120"})])
    with pytest.raises(OverloadedError) as info:
        call(make_client(mode, handler, max_retries=0), "score", ["p"], ["r"])
    assert info.value.retry_after == 120.0  # the header's advice, uncapped, for the caller to judge


# --- the pure policy functions


def test_backoff_is_exponential_capped_and_jittered():
    assert [backoff_delay(n, lambda: 0.0) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert backoff_delay(0, lambda: 1.0) == pytest.approx(0.375)  # at most 25 % shorter
    assert backoff_delay(3, lambda: 0.999999) == pytest.approx(3.0, abs=1e-5)
    assert backoff_delay(1, lambda: 0.0, initial=2.0, maximum=3.0) == 3.0


def test_backoff_jitter_spreads_with_a_real_rng():
    import random

    rng = random.Random(1234).random
    delays = [backoff_delay(2, rng) for _ in range(200)]
    assert all(1.5 <= d <= 2.0 for d in delays)
    assert max(delays) - min(delays) > 0.3  # workers shed together do not come back together


NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
        ("2", 2.0),
        ("2.5", 2.5),
        ("0", 0.0),
        ("-3", 0.0),
        ("3600", 60.0),
        ("inf", 60.0),
        ("Wed, 01 Jan 2025 12:00:10 GMT", 10.0),
        ("Wed, 01 Jan 2025 11:59:00 GMT", 0.0),
        ("Wed, 01 Jan 2025 13:00:00 GMT", 60.0),
    ],
)
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value, now=NOW) == expected


def test_parse_retry_after_cap_is_configurable():
    assert parse_retry_after("3600", cap=7200.0) == 3600.0
    assert parse_retry_after("10", cap=5.0) == 5.0


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (400, False),
        (401, False),
        (404, False),
        (408, True),
        (409, False),
        (413, False),
        (422, False),
        (429, True),
        (500, True),
        (503, True),
        (504, True),
        (599, True),
    ],
)
def test_retryable_statuses(status, retryable):
    assert is_retryable_status(status) is retryable


def test_retry_after_waits_at_least_the_advice_and_spreads_the_comebacks():
    from rmserve.client._retry import retry_after_delay

    rng = random.Random(7)
    delays = [retry_after_delay(1.0, rng.random) for _ in range(1000)]
    assert min(delays) >= 1.0 and max(delays) <= 1.25
    assert max(delays) - min(delays) > 0.2  # 1,000 workers shed together do not return together
    assert retry_after_delay(3600.0, lambda: 0.5) == 3600.0  # already over the cap: the advice itself
    assert retry_after_delay(59.0, lambda: 1.0) == 60.0
