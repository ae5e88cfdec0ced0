"""Sleep and wake over HTTP, for sharing the accelerator with training between reward phases (API.md, "Operational
routes"): vLLM's routes and SGLang's names for them.

* ``POST /sleep?level=1`` (default) — weights to host memory, caches dropped; ``?level=2`` — weights dropped, reloaded
  from the checkpoint on wake; a JSON body ``{"level": 2}`` says the same. SGLang's ``POST
  /release_memory_occupation`` is the same route (its ``{"tags": ...}`` body changes nothing).
* ``POST /wake_up`` (SGLang: ``POST /resume_memory_occupation``) — weights back, scoring resumes.
* ``GET /is_sleeping`` — ``{"is_sleeping": bool}``: true only when every replica of every served model sleeps.

Each applies to every served model (``SleepService``, over the model router's lanes) and, on Ray, to every replica of
each (``rayserve.link.RayLink``); it answers once all of them have changed state. A sleep lets the requests already
admitted finish, and from its start until a wake up has finished, a scoring request gets 503 ``sleeping`` with
``Retry-After`` (``ScoringCore``); none is lost or half scored. Both are idempotent: a model asleep stays at its level
(wake it first to change level), an awake one stays awake. They are operational routes: the API key is needed only
with ``protect_operational_routes``, as for ``/ready`` and ``/v1/models``.

Example::

    add_sleep_routes(app, SleepService(service.router.lanes), respond, protected=config.protect_operational_routes)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from rmserve.model.errors import InvalidRequestError
from rmserve.model.residency import check_level
from rmserve.serve.routing.model_routing import ModelLane

Respond = Callable[..., Awaitable[Response]]  # routes.create_http_app's respond(request, action, *, protected, drains)
MAX_SLEEP_BODY = 1 << 16  # a larger body (or one without a Content-Length) is not read for a level
LEVEL_PARAMETER = {
    "name": "level",
    "in": "query",
    "required": False,
    "schema": {"type": "integer", "enum": [1, 2], "default": 1},
    "description": "1: weights to host memory, caches dropped; 2: weights dropped (reloaded from the checkpoint)",
}


class IsSleepingResponse(BaseModel):
    is_sleeping: bool = Field(description="True when every replica of every served model sleeps.")


class SleepService:
    """Sleep and wake of every served model (each lane's ``ScorerLink`` reaches all of its replicas)."""

    def __init__(self, lanes: Sequence[ModelLane]):
        self.lanes = list(lanes)

    async def sleep(self, level: int = 1) -> IsSleepingResponse:
        """Every model to sleep at ``level``; answers once all of them sleep."""
        check_level(level)
        await asyncio.gather(*(lane.link.sleep(level) for lane in self.lanes))
        return IsSleepingResponse(is_sleeping=True)

    async def wake_up(self) -> IsSleepingResponse:
        """Every model awake; answers once all of them score again."""
        await asyncio.gather(*(lane.link.wake_up() for lane in self.lanes))
        return IsSleepingResponse(is_sleeping=False)

    async def is_sleeping(self) -> IsSleepingResponse:
        states = await asyncio.gather(*(lane.link.is_sleeping() for lane in self.lanes))
        return IsSleepingResponse(is_sleeping=all(states))


def level_of(query: Any, body: bytes = b"") -> int:
    """The ``level`` query parameter, or a JSON body's ``level`` (``{"level": 2}``, as a client that posts JSON sends
    it); 1 when neither gives one; a 422 naming it when one is not 1 or 2 (``check_level``) or the two disagree. Any
    other body (SGLang's ``{"tags": ...}``, none) leaves the level alone."""
    given = []
    if (text := query.get("level")) is not None:
        given.append(int(text) if text.isdigit() else text)
    try:
        parsed = json.loads(body) if body.strip() else None
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if isinstance(parsed, dict) and "level" in parsed:
        given.append(parsed["level"])
    levels = {check_level(value) for value in given}
    if len(levels) > 1:
        raise InvalidRequestError(f"the query's level and the body's differ: {given}", param="level")
    return levels.pop() if levels else 1


def add_sleep_routes(app: FastAPI, sleep: SleepService, respond: Respond, *, protected: bool) -> None:
    """Register the sleep and wake routes (vLLM's paths and SGLang's aliases) on ``app``; ``respond`` is the app's
    shared plumbing (API key, deadline, error mapping), ``protected`` whether operational routes need the key."""

    async def sleep_route(request: Request) -> Response:
        async def action() -> IsSleepingResponse:
            declared = request.headers.get("content-length", "")  # a body of unknown length is not read
            body = await request.body() if declared.isdigit() and 0 < int(declared) <= MAX_SLEEP_BODY else b""
            return await sleep.sleep(level_of(request.query_params, body))

        return await respond(request, action, protected=protected)

    async def wake_route(request: Request) -> Response:
        return await respond(request, sleep.wake_up, protected=protected)

    async def state_route(request: Request) -> Response:
        return await respond(request, sleep.is_sleeping, protected=protected, drains=False)

    released = "the model's accelerator memory is released; scoring answers 503 sleeping until a wake up"
    for path, summary in (("/sleep", "Sleep (vLLM)"), ("/release_memory_occupation", "Alias of /sleep (SGLang)")):
        app.add_api_route(
            path,
            sleep_route,
            methods=["POST"],
            response_model=IsSleepingResponse,
            summary=summary,
            description=released,
            openapi_extra={"parameters": [LEVEL_PARAMETER]},
        )
    for path, summary in (("/wake_up", "Wake up (vLLM)"), ("/resume_memory_occupation", "Alias of /wake_up (SGLang)")):
        app.add_api_route(path, wake_route, methods=["POST"], response_model=IsSleepingResponse, summary=summary)
    app.add_api_route(
        "/is_sleeping", state_route, methods=["GET"], response_model=IsSleepingResponse, summary="Whether it sleeps"
    )
