"""rmserve's one error vocabulary.

Every failure a user can cause or observe is one of these classes. Each carries the HTTP status
and the error ``type`` string of API.md's error table, so the server maps any of them to a response
in exactly one place (``rmserve.serve.errors.error_response``) and the client SDK mirrors them.

Example::

    raise InvalidRequestError("item 3: 'response' must be a string", param="items[3].response")
"""

from __future__ import annotations


class RMServeError(Exception):
    """Base class. ``status`` and ``type`` follow API.md's error table."""

    status: int = 500
    type: str = "internal"

    def __init__(self, message: str, *, param: str | None = None, index: int | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.index = index  # the item index within its request, when the error belongs to one item

    def to_dict(self) -> dict:
        """The JSON body of API.md: ``{"error": {"message", "type", "code", "param"}}``."""
        return {"error": {"message": self.message, "type": self.type, "code": self.status, "param": self.param}}

    def __reduce__(self):  # keep the keyword arguments when pickled across Ray processes
        return (_rebuild, (type(self), self.message, self.param, self.index, dict(self.__dict__)))


def _rebuild(cls, message, param, index, state):
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    err.message, err.param, err.index = message, param, index
    return err


class InvalidRequestError(RMServeError):
    """Malformed or invalid input: wrong types, empty lists, unknown roles, bad token ids."""

    status = 400
    type = "invalid_request"


class ContextLengthExceededError(InvalidRequestError):
    """An item is longer than ``max_length`` and the truncation policy is ``error``."""

    type = "context_length_exceeded"


class ItemTooLargeForMemoryError(ContextLengthExceededError):
    """A single item ran out of accelerator memory even in a micro-batch of its own."""


class RequestTooLargeError(RMServeError):
    status = 413
    type = "request_too_large"


class UnauthorizedError(RMServeError):
    status = 401
    type = "unauthorized"


class OverloadedError(RMServeError):
    """The queue is full; the client should retry after ``retry_after`` seconds."""

    status = 429
    type = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0, param: str | None = None):
        super().__init__(message, param=param)
        self.retry_after = retry_after


class NotReadyError(RMServeError):
    status = 503
    type = "not_ready"


class RequestTimeoutError(RMServeError):
    status = 504
    type = "timeout"


class InternalError(RMServeError):
    status = 500
    type = "internal"


class ModelLoadError(RMServeError):
    """The checkpoint could not be loaded (missing files, no reward head, unsupported format)."""

    status = 500
    type = "internal"


def item_error(cls: type[RMServeError], index: int, message: str, field: str | None = None) -> RMServeError:
    """An error that names the item it belongs to: ``item 3: ...`` with ``param='items[3].field'``."""
    param = f"items[{index}]" + (f".{field}" if field else "")
    return cls(f"item {index}: {message}", param=param, index=index)
