"""The one mapping from any exception to API.md's error response (status, JSON body, headers).

The error classes live in ``rmserve.model.errors``; this module only decides how an exception that
is not one of them (a Ray wrapper, a pydantic validation error, a timeout, a bug) is presented.
Unknown exceptions become a 500 ``internal`` error whose message carries a reference id and nothing
else; the details go to the server log under that id.

Example::

    try:
        ...
    except Exception as exc:
        return error_response(exc)   # JSONResponse {"error": {"message", "type", "code", "param"}}
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import Callable

from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from rmserve.model.errors import (
    ClientClosedRequestError,
    InternalError,
    InvalidRequestError,
    OverloadedError,
    RequestTimeoutError,
    RMServeError,
    SleepingError,
    UnauthorizedError,
    field_path,
    meant_error,
)

log = logging.getLogger("rmserve.serve")


def as_rmserve_error(exc: BaseException) -> RMServeError:
    """The ``RMServeError`` a client sees for ``exc`` (Ray's own failures were translated where the call crossed Ray,
    ``rayserve.link``)."""
    if isinstance(exc, RMServeError):
        return exc
    if isinstance(exc, ValidationError):
        return validation_error(exc)
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return RequestTimeoutError("the request did not finish before its deadline")
    if isinstance(exc, ClientDisconnect):  # a routine client timeout, not a server failure: no traceback
        log.info("client closed the request before its body was read")
        return ClientClosedRequestError("client closed request")
    if isinstance(exc, HTTPException):
        err = InvalidRequestError(str(exc.detail))
        err.status = exc.status_code
        return err
    return internal_error(exc)


def internal_error(exc: BaseException, context: str = "handling a request") -> InternalError:
    """A sanitised 500: the client gets a reference id, the log gets the traceback."""
    reference = secrets.token_hex(6)
    log.error("internal error %s while %s: %r", reference, context, exc, exc_info=exc)
    return InternalError(f"internal error (reference {reference}); the details are in the server log")


def validation_error(exc: ValidationError) -> InvalidRequestError:
    """A 422 ``invalid_request`` naming the offending field as the caller wrote it, e.g. ``items[2].response``."""
    first = meant_error(exc.errors())
    if first["type"] == "model_type" and not first["loc"]:
        message = "the request body must be a JSON object"
    else:
        message = first["msg"].removeprefix("Value error, ")
    path = field_path(first["loc"])
    return InvalidRequestError(f"{path}: {message}" if path else message, param=path or None, detail=message)


def error_headers(err: RMServeError) -> dict[str, str] | None:
    if isinstance(err, OverloadedError | SleepingError):
        return {"Retry-After": str(max(1, math.ceil(err.retry_after)))}
    if isinstance(err, UnauthorizedError):
        return {"WWW-Authenticate": "Bearer"}
    return None


def error_response(exc: BaseException, adapt: Callable[[RMServeError], RMServeError] | None = None) -> JSONResponse:
    """API.md's error response for any exception; ``adapt`` lets a compatibility route restyle it (e.g. vLLM's 400)."""
    err = as_rmserve_error(exc)
    if adapt is not None:
        err = adapt(err)
    return JSONResponse(err.to_dict(), status_code=err.status, headers=error_headers(err))
