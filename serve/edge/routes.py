"""The FastAPI app of both runtimes: thin routes over ``GatewayService``, plus the HTTP plumbing every route
shares (API key, bounded body read, JSON parsing, request deadline, error mapping).

``create_http_app(service, config)`` needs no Ray: the service reaches each model through its ``ScorerLink`` (a core
in this process, or a Scorer deployment). The compatibility routes (``compat.py``) use the same plumbing;
``GET /metrics`` renders ``metrics.scrape()`` (``LocalMetrics`` in one process; the Ray Gateway passes
``ClusterMetrics``: totals over all replicas) and a middleware counts every request.

Example::

    app = create_http_app(GatewayService([LocalLink(core)], config), config)
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException

from rmserve.model.errors import InvalidRequestError, RequestTooLargeError, RMServeError
from rmserve.serve.config.settings import ServerConfig
from rmserve.serve.edge.auth import ApiKeyAuth
from rmserve.serve.edge.compat import with_status
from rmserve.serve.edge.drain import Drain
from rmserve.serve.edge.endpoints import ENDPOINTS, endpoints_by_path
from rmserve.serve.edge.errors import error_response
from rmserve.serve.edge.pipeline import Context, Endpoint
from rmserve.serve.edge.protocol import HealthResponse, ModelsResponse, ReadyResponse
from rmserve.serve.edge.service import GatewayService
from rmserve.serve.edge.sleep import SleepService, add_sleep_routes
from rmserve.serve.metrics.instrumentation import RequestMetricsMiddleware
from rmserve.serve.metrics.store import LocalMetrics, ServedMetrics
from rmserve.serve.metrics.telemetry import RewardTelemetry

_ERROR_BODY = {
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {
                            "message": {"type": "string"},
                            "type": {"type": "string"},
                            "code": {"type": "integer"},
                            "param": {"type": ["string", "null"]},
                        },
                        "required": ["message", "type", "code", "param"],
                    }
                },
                "required": ["error"],
            }
        }
    }
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": text, **_ERROR_BODY}
    for code, text in [
        (400, "invalid_request / context_length_exceeded"),
        (401, "unauthorized"),
        (404, "invalid_request: the request's model is not served here (param 'model')"),
        (413, "request_too_large"),
        (422, "invalid_request: malformed JSON, wrong types, unknown fields, empty lists, bad items"),
        (429, "overloaded"),
        (500, "internal"),
        (503, "not_ready / sleeping (POST /sleep; Retry-After)"),
        (504, "timeout"),
    ]
}


def parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8 (or UTF-16/32), no NaN/Infinity literals, no unpaired surrogates, integers of at most
    4,300 digits; errors are 400 invalid_request."""
    if not raw.strip():
        raise InvalidRequestError("the request body is empty; expected a JSON object")
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidRequestError("the JSON body is nested too deeply") from None
    except UnicodeDecodeError:
        raise InvalidRequestError("the request body is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError:  # Python's limit on digits in an integer literal
        raise InvalidRequestError("malformed JSON: a number has too many digits") from None
    if _SURROGATE_ESCAPE.search(raw) or not json.detect_encoding(raw).startswith("utf-8"):
        _reject_unpaired_surrogates(value)
    return value


# A \uD800-\uDFFF escape: json.loads turns an unpaired one into a string that is not valid Unicode, which
# the tokenizer cannot encode (the check re-encodes the whole body, so it runs only when such an escape is there).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _reject_unpaired_surrogates(value: Any) -> None:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError("malformed JSON: a string holds an unpaired UTF-16 surrogate") from None


def _reject_constant(name: str) -> Any:
    raise InvalidRequestError(f"malformed JSON: {name} is not a JSON number")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(f"the request body ({declared} bytes) exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(f"the request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


REQUEST_MODELS = tuple(dict.fromkeys(e.request for e in ENDPOINTS))


def _openapi_extra(path: str, rows: Sequence[Endpoint]) -> dict:
    """OpenAPI request body (and path parameter) of a scoring route, which reads its body itself
    (``_document_request_models`` adds the schemas)."""
    refs = [{"$ref": f"#/components/schemas/{e.request.__name__}"} for e in rows]
    schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
    extra: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
    if "{model" in path:
        extra["parameters"] = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
    return extra


def _document_request_models(app: FastAPI) -> None:
    """Put the request models (and the item models they use) into the OpenAPI document's components."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            _, defs = models_json_schema(
                [(m, "validation") for m in REQUEST_MODELS], ref_template="#/components/schemas/{model}"
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_http_app(
    service: GatewayService,
    config: ServerConfig,
    *,
    metrics: ServedMetrics | None = None,
    drain: Drain | None = None,
) -> FastAPI:
    auth = ApiKeyAuth(config.api_key_values())
    limits = config.limits
    metrics = metrics or LocalMetrics()
    if service.telemetry is None:  # without a Gateway (tests): this process's answers, in this process's /metrics
        service.telemetry = RewardTelemetry(metrics.recorder, config.reward_window_items)
        metrics.sources.append(service.telemetry.snapshot)
    drain = drain or Drain()

    async def respond(
        request: Request,
        action: Callable[[], Awaitable[BaseModel | Response]],
        *,
        protected: bool = True,
        adapt_error: Callable[[RMServeError], RMServeError] | None = None,
        drains: bool = True,
    ) -> Response:
        """Authenticate, run ``action`` within the deadline, map errors. While the server shuts down, a route that
        ``drains`` refuses new requests (503) and finishes the accepted ones."""

        async def run() -> BaseModel | Response:
            if protected:
                auth.check(request.headers)
            return await action()

        try:
            if drains:
                drain.admit()
        except Exception as exc:
            return error_response(exc, adapt_error)
        try:
            result = await asyncio.wait_for(run(), limits.request_timeout_s)
            if isinstance(result, Response):
                return result
            # Inside the try: a value JSON cannot carry (NaN, infinity) becomes a 500 with the error body.
            return JSONResponse(result.model_dump(mode="json"))
        except Exception as exc:
            return error_response(exc, adapt_error)
        finally:
            if drains:
                drain.release()

    def scoring_route(rows: Sequence[Endpoint]) -> Callable[[Request], Awaitable[Response]]:
        """The route of one path: its body picks a row of the table (the last row answers what no row accepts)."""

        async def handle(request: Request) -> Response:
            chosen = [rows[-1]]

            async def action() -> BaseModel:
                body = parse_json(await read_body(request, limits.max_body_bytes))
                endpoint = chosen[0] = next((row for row in rows if row.accepts(body)), rows[-1])
                context = Context(service, request.path_params.get("model"), request.query_params)
                return await service.run(endpoint, endpoint.request.model_validate(body), context)

            return await respond(request, action, adapt_error=lambda err: with_status(chosen[0].invalid_status)(err))

        return handle

    async def scrape() -> Response:
        return Response(await metrics.scrape(), media_type=metrics.content_type)

    app = FastAPI(title="rmserve", version="0.1.0", summary="Reward-model inference server for RLHF.")
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(RequestMetricsMiddleware, recorder=metrics.recorder)
    _document_request_models(app)
    ops = config.protect_operational_routes

    for path, rows in endpoints_by_path().items():
        responses = [row.response for row in rows]
        app.add_api_route(
            path,
            scoring_route(rows),
            methods=["POST"],
            response_model=responses[0] if len(responses) == 1 else Union[tuple(responses)],  # noqa: UP007
            responses=ERROR_RESPONSES,
            openapi_extra=_openapi_extra(path, rows),
            summary=" / ".join(row.summary for row in rows),
            name=rows[0].name if len(rows) == 1 else "+".join(row.name for row in rows),
        )

    @app.get("/health", response_model=HealthResponse, responses=ERROR_RESPONSES, summary="The process is up")
    async def health(request: Request) -> Response:
        return await respond(request, _healthy, protected=ops, drains=False)

    @app.get("/ready", response_model=ReadyResponse, responses=ERROR_RESPONSES, summary="The model can score")
    async def ready(request: Request) -> Response:
        return await respond(request, service.ready, protected=ops)

    @app.get(
        "/v1/models",
        response_model=ModelsResponse,
        responses=ERROR_RESPONSES,
        summary="The served models and ensembles",
    )
    async def models(request: Request) -> Response:
        return await respond(request, service.models, protected=ops)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses=ERROR_RESPONSES,
        summary="Prometheus metrics: totals over all replicas",
    )
    async def prometheus_metrics(request: Request) -> Response:
        return await respond(request, scrape, protected=ops, drains=False)

    add_sleep_routes(app, SleepService(service.router.lanes), respond, protected=ops)
    return app


async def _http_error(_request: Request, exc: Exception) -> Response:
    response = error_response(exc)  # 404 / 405 from routing, in the API's error body
    response.headers.update(getattr(exc, "headers", None) or {})  # e.g. the Allow header of a 405
    return response


async def _healthy() -> HealthResponse:
    return HealthResponse()
