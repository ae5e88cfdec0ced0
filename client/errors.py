"""The client's exception tree. It mirrors the error table of the server (API.md, "Errors").

::

    RewardServerError
    ├── APIConnectionError              the request never got an HTTP answer
    │   └── APITimeoutError             ... because it timed out
    ├── APIResponseValidationError      a 2xx answer whose body is not what the API promises
    └── APIStatusError                  any non-2xx answer (status, type, message, param, request_id, body)
        ├── InvalidRequestError         400 / 422  invalid_request
        │   └── ContextLengthExceededError   400  context_length_exceeded
        ├── UnauthorizedError           401  unauthorized
        ├── RequestTooLargeError        413  request_too_large
        ├── OverloadedError             429  overloaded (``retry_after`` in seconds, when sent)
        ├── NotReadyError               503  not_ready
        ├── SleepingError               503  sleeping (the models sleep until ``wake_up``; ``retry_after``)
        ├── GatewayTimeoutError         504  timeout
        └── InternalServerError         500 and other 5xx  internal

Example::

    from rmserve.client import RewardClient, ContextLengthExceededError

    try:
        rewards = RewardClient().score(prompts, responses)
    except ContextLengthExceededError as err:
        print(err.param, err.message)  # e.g. items[3], "item 3: 9000 tokens > max_length 4096"
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = [
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "ContextLengthExceededError",
    "GatewayTimeoutError",
    "InternalServerError",
    "InvalidRequestError",
    "NotReadyError",
    "OverloadedError",
    "RequestTooLargeError",
    "RewardServerError",
    "SleepingError",
    "UnauthorizedError",
]


class RewardServerError(Exception):
    """Base class of every error the client raises (argument errors stay ``ValueError``/``TypeError``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class APIConnectionError(RewardServerError):
    """No HTTP response: connection refused or reset, DNS failure, protocol error. Retried before raised."""

    def __init__(self, message: str = "Connection error.", *, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.request = request


class APITimeoutError(APIConnectionError):
    """The attempt ran past the client's ``timeout`` (connect, read, write or pool)."""

    def __init__(self, message: str = "Request timed out.", *, request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class APIResponseValidationError(RewardServerError):
    """The server answered 2xx with a body that does not match the API (e.g. fewer rewards than items)."""

    def __init__(self, message: str, *, body: Any = None) -> None:
        super().__init__(message)
        self.body = body


class APIStatusError(RewardServerError):
    """A non-2xx answer. ``type`` is the server's ``error.type`` (``None`` when the body had none).

    Attributes: ``status`` (also ``status_code``), ``type``, ``message``, ``param``, ``code``,
    ``request_id`` (the ``x-request-id`` header, for the server log), ``body`` (decoded JSON or text),
    ``headers`` and ``retry_after`` (seconds from the ``Retry-After`` header, uncapped; ``None`` if absent).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        type: str | None = None,
        param: str | None = None,
        code: int | None = None,
        request_id: str | None = None,
        body: Any = None,
        headers: httpx.Headers | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.request_id = request_id
        self.body = body
        self.headers = headers if headers is not None else httpx.Headers()
        self.retry_after = retry_after

    @property
    def status_code(self) -> int:
        return self.status

    def __str__(self) -> str:
        kind = f" {self.type}" if self.type else ""
        rid = f" (request id {self.request_id})" if self.request_id else ""
        return f"Error code: {self.status}{kind} - {self.message}{rid}"


class InvalidRequestError(APIStatusError):
    """400/422 ``invalid_request``: malformed JSON, wrong types, unknown fields, empty or mixed item lists."""


class ContextLengthExceededError(InvalidRequestError):
    """400 ``context_length_exceeded``: an item is longer than the model's ``max_length`` (policy ``error``)."""


class UnauthorizedError(APIStatusError):
    """401 ``unauthorized``: missing or wrong API key (``api_key=`` or ``RMSERVE_API_KEY``)."""


class RequestTooLargeError(APIStatusError):
    """413 ``request_too_large``: body or item count over the server's limit; lower ``max_items_per_request``."""


class OverloadedError(APIStatusError):
    """429 ``overloaded``: the server's queue is full; ``retry_after`` holds the advised wait in seconds."""


class NotReadyError(APIStatusError):
    """503 ``not_ready``: the model is still loading or warming up."""


class SleepingError(APIStatusError):
    """503 ``sleeping``: the server's models sleep (``sleep()``, ``POST /sleep``) until someone calls ``wake_up()``.

    Scoring calls retry it like any 503, waiting the ``Retry-After`` the server sends, so a call that races a
    ``wake_up`` succeeds; a server left asleep raises this once the retries are spent (``max_retries=0``: at once).
    """


class GatewayTimeoutError(APIStatusError):
    """504 ``timeout``: the request waited on the server longer than its deadline."""


class InternalServerError(APIStatusError):
    """500 ``internal`` and any other 5xx; the details are in the server log under ``request_id``."""
