"""The one exception → HTTP response mapping of serve/edge/errors.py (API.md's error table)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from pydantic import BaseModel, ValidationError
from ray.exceptions import RayTaskError
from starlette.exceptions import HTTPException

from rmserve.model.errors import (
    ContextLengthExceededError,
    InternalError,
    InvalidRequestError,
    ModelLoadError,
    NotReadyError,
    OverloadedError,
    RequestTimeoutError,
    RequestTooLargeError,
    UnauthorizedError,
    field_path,
    item_error,
)
from rmserve.serve.edge.errors import as_rmserve_error, error_response
from rmserve.serve.rayserve.link import from_ray


def body_of(response) -> dict:
    return json.loads(response.body)


@pytest.mark.parametrize(
    ("exc", "status", "type_"),
    [
        (InvalidRequestError("bad"), 422, "invalid_request"),
        (ContextLengthExceededError("long"), 400, "context_length_exceeded"),
        (RequestTooLargeError("big"), 413, "request_too_large"),
        (UnauthorizedError("who"), 401, "unauthorized"),
        (OverloadedError("full", retry_after=2.5), 429, "overloaded"),
        (NotReadyError("wait"), 503, "not_ready"),
        (RequestTimeoutError("late"), 504, "timeout"),
        (InternalError("oops"), 500, "internal"),
        (ModelLoadError("no head"), 500, "internal"),
        (asyncio.TimeoutError(), 504, "timeout"),
        (HTTPException(404, "Not Found"), 404, "invalid_request"),
    ],
)
def test_status_type_and_body(exc, status, type_):
    response = error_response(exc)
    assert response.status_code == status
    body = body_of(response)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["type"] == type_ and body["error"]["code"] == status
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def test_retry_after_and_www_authenticate_headers():
    assert error_response(OverloadedError("full", retry_after=2.5)).headers["retry-after"] == "3"
    assert error_response(OverloadedError("full", retry_after=0.1)).headers["retry-after"] == "1"
    assert error_response(UnauthorizedError("who")).headers["www-authenticate"] == "Bearer"
    assert "retry-after" not in error_response(InvalidRequestError("x")).headers


def test_item_errors_keep_index_and_param():
    body = body_of(error_response(item_error(ContextLengthExceededError, 3, "too long")))
    assert body["error"] == {
        "message": "items[3]: too long",
        "type": "context_length_exceeded",
        "code": 400,
        "param": "items[3]",
    }


def test_unknown_exceptions_are_sanitised_and_logged(caplog):
    with caplog.at_level(logging.ERROR, logger="rmserve.serve"):
        response = error_response(KeyError("/secret/path/to/weights"))
    body = body_of(response)
    assert response.status_code == 500 and body["error"]["type"] == "internal"
    assert "secret" not in body["error"]["message"] and "KeyError" not in body["error"]["message"]
    reference = body["error"]["message"].split("reference ")[1].split(")")[0]
    assert any(reference in r.getMessage() and "secret" in r.getMessage() for r in caplog.records)


def test_ray_task_errors_are_unwrapped():
    cause = item_error(InvalidRequestError, 2, "bad role", field="messages")
    wrapped = RayTaskError("score_request", "traceback text", cause)
    err = as_rmserve_error(from_ray(wrapped))
    assert err is cause or (err.status, err.message, err.param) == (
        422,
        "items[2].messages: bad role",
        "items[2].messages",
    )


def test_validation_errors_are_422():
    class Body(BaseModel):
        n: int

    with pytest.raises(ValidationError) as info:
        Body.model_validate({"n": "x"})
    response = error_response(info.value)
    assert response.status_code == 422
    assert body_of(response)["error"]["param"] == "n"


def test_field_path_drops_union_member_names():
    assert field_path(("items", 0, "pair", "response")) == "items[0].response"
    assert field_path(("items", 1, "text", "text")) == "items[1].text"
    assert field_path(("items", 0, "pair", "prompt", "list[Message]", 2, "role")) == "items[0].prompt[2].role"
    assert field_path(("items", 0, "pair", "prompt", "str")) == "items[0].prompt"
    assert field_path(()) == ""
