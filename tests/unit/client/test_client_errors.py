"""Error parsing: every row of API.md's error table becomes its exception, with all its fields."""

from __future__ import annotations

import httpx
import pytest
from client_fakes import call, make_client

from rmserve.client import (
    APIResponseValidationError,
    APIStatusError,
    ContextLengthExceededError,
    GatewayTimeoutError,
    InternalServerError,
    InvalidRequestError,
    NotReadyError,
    OverloadedError,
    RequestTooLargeError,
    RewardServerError,
    UnauthorizedError,
)
from rmserve.client._core import make_status_error

# API.md, "Errors": (situation, status, type, the class the client must raise).
ERROR_TABLE = [
    ("malformed", 400, "invalid_request", InvalidRequestError),
    ("unknown-field", 422, "invalid_request", InvalidRequestError),
    ("too-long", 400, "context_length_exceeded", ContextLengthExceededError),
    ("over-limit", 413, "request_too_large", RequestTooLargeError),
    ("no-key", 401, "unauthorized", UnauthorizedError),
    ("queue-full", 429, "overloaded", OverloadedError),
    ("loading", 503, "not_ready", NotReadyError),
    ("deadline", 504, "timeout", GatewayTimeoutError),
    ("anything-else", 500, "internal", InternalServerError),
]


@pytest.mark.parametrize(("status", "error_type", "cls"), [r[1:] for r in ERROR_TABLE], ids=[r[0] for r in ERROR_TABLE])
def test_error_table_row_maps_to_its_exception(mode, status, error_type, cls):
    body = {"error": {"message": f"{error_type} happened", "type": error_type, "code": status, "param": "items[0]"}}
    headers = {"x-request-id": "req-123", "Retry-After": "1"}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body, headers=headers)

    with pytest.raises(cls) as info:
        call(make_client(mode, handler, max_retries=0), "score", ["p"], ["r"])
    err = info.value
    assert type(err) is cls
    assert isinstance(err, APIStatusError) and isinstance(err, RewardServerError)
    assert (err.status, err.status_code, err.type, err.code) == (status, status, error_type, status)
    assert err.message == f"{error_type} happened"
    assert err.param == "items[0]"
    assert err.request_id == "req-123"
    assert err.body == body
    assert err.retry_after == 1.0
    assert str(err) == f"Error code: {status} {error_type} - {error_type} happened (request id req-123)"


def test_context_length_is_an_invalid_request():
    err = make_status_error(400, b'{"error": {"message": "m", "type": "context_length_exceeded", "code": 400}}')
    assert isinstance(err, InvalidRequestError)


@pytest.mark.parametrize(
    ("status", "content", "cls", "message", "error_type"),
    [
        # The body's type wins over the status (a proxy may rewrite statuses, the server's type is exact).
        (
            500,
            b'{"error": {"message": "loading", "type": "not_ready", "code": 503}}',
            NotReadyError,
            "loading",
            "not_ready",
        ),
        # No usable type: the status decides.
        (503, b"", NotReadyError, "HTTP 503", None),
        (429, b'{"error": {"message": "busy", "type": "brand_new_type"}}', OverloadedError, "busy", "brand_new_type"),
        (
            502,
            b"<html><body>Bad Gateway</body></html>",
            InternalServerError,
            "<html><body>Bad Gateway</body></html>",
            None,
        ),
        (404, b'{"detail": "Not Found"}', APIStatusError, "Not Found", None),
        (422, b'{"detail": [{"loc": ["body", "items"], "msg": "field required"}]}', InvalidRequestError, None, None),
        (418, b"I'm a teapot", APIStatusError, "I'm a teapot", None),
        (400, b'{"error": "just a string"}', InvalidRequestError, '{"error": "just a string"}', None),
        (500, b"\xff\xfe not utf-8", InternalServerError, "\ufffd\ufffd not utf-8", None),
    ],
)
def test_odd_error_bodies_are_tolerated(status, content, cls, message, error_type):
    err = make_status_error(status, content, httpx.Headers())
    assert type(err) is cls
    assert err.status == status and err.type == error_type and err.request_id is None and err.param is None
    if message is not None:
        assert err.message == message
    else:
        assert "field required" in err.message  # FastAPI's validation detail, serialised


def test_wrong_typed_error_fields_are_dropped():
    err = make_status_error(400, b'{"error": {"message": "m", "type": 7, "code": "x", "param": ["items"]}}')
    assert type(err) is InvalidRequestError
    assert (err.type, err.code, err.param) == (None, None, None)


def test_success_with_a_body_that_breaks_the_contract_raises_validation_error(mode):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"model": "m", "rewards": [1.0], "truncated": []})  # two items were sent

    with pytest.raises(APIResponseValidationError, match="1 rewards for 2 inputs"):
        call(make_client(mode, handler), "score", ["p", "q"], ["r", "s"])

    def not_json(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="ok")

    with pytest.raises(APIResponseValidationError) as info:
        call(make_client(mode, not_json), "score", ["p"], ["r"])
    assert info.value.body == "ok"
