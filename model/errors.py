"""rmserve's one error vocabulary.

Every failure a user can cause or observe is one of these classes. Each carries the HTTP status
and the error ``type`` string of API.md's error table, so the server maps any of them to a response
in exactly one place (``rmserve.serve.edge.errors.error_response``) and the client SDK mirrors them.

An error that belongs to one item carries where it is as data: ``index`` (the item's position in the
flat list that was scored) and ``field`` (the path inside the item, e.g. ``prompt[0].role``). A route
that built that list from its own request shape (``pairs``, ``groups``, ``query``, ``input``) names the
caller's field with ``relocate`` — nobody parses a message to find the item.

Example::

    err = item_error(InvalidRequestError, 3, "response is empty", field="response")
    err.param, err.message          # "items[3].response", "items[3].response: response is empty"
    err.relocate("pairs[1].response_b")   # the caller sent pairs; item 3 is pair 1's response_b
"""

from __future__ import annotations


class RMServeError(Exception):
    """Base class. ``status`` and ``type`` follow API.md's error table."""

    status: int = 500
    type: str = "internal"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        index: int | None = None,
        field: str | None = None,
        detail: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.index = index  # the item index within its request, when the error belongs to one item
        self.field = field  # the path inside that item (``response``, ``prompt[0].role``), when known
        self.detail = detail if detail is not None else message  # the message without the item's name

    def relocate(self, param: str) -> RMServeError:
        """Name the failing field as the caller wrote it: ``param`` and the message's prefix both become it."""
        self.param = param
        self.message = f"{param}: {self.detail}"
        self.args = (self.message,)
        return self

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
    """Malformed or invalid input: bad JSON, wrong types, unknown fields, empty lists, unknown roles, bad token ids.

    422 wherever it is caught (the Gateway's schema or the Scorer's item checks); vLLM's ``/classify`` answers
    400 for the same mistakes, and that route restyles it.
    """

    status = 422
    type = "invalid_request"


class ContextLengthExceededError(InvalidRequestError):
    """An item is longer than ``max_length`` and the truncation policy is ``error``."""

    status = 400
    type = "context_length_exceeded"


class WrongModelKindError(InvalidRequestError):
    """The route does not fit the model's kind: an outcome route (``/v1/score``, ``/classify`` ...) on a process
    reward model, or ``/v1/steps`` (``/pooling``) on an outcome reward model. 400; the message names the model."""

    status = 400


class ItemTooLargeForMemoryError(ContextLengthExceededError):
    """A single item ran out of accelerator memory even in a micro-batch of its own."""


class ModelNotFoundError(InvalidRequestError):
    """The request names a model this server does not serve (``param="model"``)."""

    status = 404


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


class SleepingError(RMServeError):
    """The model sleeps (``POST /sleep``) or is between sleeping and awake; ``retry_after`` is the advised wait.

    503 with ``Retry-After``: scoring resumes once someone calls ``POST /wake_up``. Nothing of the request was
    scored (it was refused before admission)."""

    status = 503
    type = "sleeping"

    def __init__(self, message: str, *, retry_after: float = 1.0, param: str | None = None):
        super().__init__(message, param=param)
        self.retry_after = retry_after


class RequestTimeoutError(RMServeError):
    status = 504
    type = "timeout"


class ClientClosedRequestError(RMServeError):
    """The client went away before the server could answer (mid-body or while scoring): nginx's 499.

    Nobody receives this response; it exists so logs and ``/metrics`` count the outcome apart from 5xx.
    """

    status = 499
    type = "client_closed_request"


class InternalError(RMServeError):
    status = 500
    type = "internal"


class ModelLoadError(RMServeError):
    """The checkpoint could not be loaded (missing files, no reward head, unsupported format)."""

    status = 500
    type = "internal"


def item_error(cls: type[RMServeError], index: int, message: str, field: str | None = None) -> RMServeError:
    """An error that names the item it belongs to: ``param='items[3].field'``, message ``items[3].field: ...``.

    ``index`` and ``field`` stay on the error, so a route can ``relocate`` it into its caller's terms.
    """
    param = f"items[{index}]" + (f".{field}" if field else "")
    return cls(f"{param}: {message}", param=param, index=index, field=field, detail=message)


# Names pydantic puts in an error's location that are not fields: the item union's tags (right after
# a list index) and union members' type names.
_ITEM_TAGS = frozenset({"pair", "conversation", "text", "tokens"})
_TYPE_LABELS = frozenset({"str", "int", "bool", "float"})


def meant_error(errors: list[dict]) -> dict:
    """Of the errors pydantic reports for a value (one per alternative of a union: a prompt that is text or messages),
    the one the sender meant: the deepest location (a list of messages is judged as messages, not as a string)."""
    return max(errors, key=lambda e: len(e["loc"]))


def field_path(loc: tuple) -> str:
    """A pydantic error location in the caller's terms, the one place positions are named:
    ``('items', 0, 'pair', 'response')`` → ``items[0].response``."""
    out = ""
    for k, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif k > 0 and (part in _TYPE_LABELS or "[" in part or (part in _ITEM_TAGS and isinstance(loc[k - 1], int))):
            continue  # a union member's name, not a field
        else:
            out += f".{part}" if out else str(part)
    return out
