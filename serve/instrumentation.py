"""Where the metrics of ``metrics.py`` are recorded: the Scorer's hooks and the Gateway's HTTP middleware.

Neither needs Ray: ``ScorerMetrics`` is fed by the engine's micro-batch observer, the ``EngineFeeder``'s
batch callback and the Scorer's request path; ``RequestMetricsMiddleware`` wraps the FastAPI app.

Example::

    metrics = ScorerMetrics(model.info())
    model.engine.observers.append(metrics.on_forward)      # forward passes
    EngineFeeder(..., on_run=metrics.on_batch)             # batches
    metrics.on_request(items=4, input_tokens=120, truncated=0)
    metrics.snapshot(queue_depth=0, rejected_requests=0, oom_splits=0)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from .metrics import MetricsRecorder, Snapshot

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]
UNMATCHED_ROUTE = "other"  # requests to paths the app does not serve share one label (bounded cardinality)
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer; not a server error
log = logging.getLogger("rmserve.serve")


class ScorerMetrics:
    """The metrics of one Scorer replica."""

    def __init__(self, model_info: dict):
        self.recorder = MetricsRecorder()
        self.recorder.set(
            "model_info",
            1,
            model=model_info["id"],
            dtype=model_info["dtype"],
            quantization=model_info["quantization"],
        )
        self.recorder.set("scorer_replicas", 1)
        self._batch_padded_tokens = 0  # of the batch running now (forward thread; read after the batch)

    def on_forward(self, rows: int, padded_tokens: int, real_tokens: int, seconds: float) -> None:
        """``ScoringEngine`` observer: one forward pass (micro-batch)."""
        self.recorder.observe("forward_duration_seconds", seconds)
        self.recorder.inc("forward_real_tokens", real_tokens)
        self.recorder.inc("forward_padded_tokens", padded_tokens)
        self._batch_padded_tokens += padded_tokens

    def on_batch(self, lengths: Sequence[int], merged: int = 1) -> None:
        """``EngineFeeder`` callback, after a batch ran (its forward passes have all reported)."""
        self.recorder.observe("batch_size_items", len(lengths))
        self.recorder.observe("batch_padded_tokens", self._batch_padded_tokens)
        self._batch_padded_tokens = 0

    def on_request(self, items: int, input_tokens: int, truncated: int) -> None:
        """A request's items were scored (its rewards are about to be returned)."""
        self.recorder.inc("items_scored", items)
        self.recorder.inc("input_tokens", input_tokens)
        self.recorder.inc("truncated_items", truncated)

    def snapshot(
        self, *, queue_depth: int, rejected_requests: int, oom_splits: int, client_gone_items: int = 0
    ) -> Snapshot:
        """The replica's metrics, with the values the Scorer and the engine count themselves."""
        self.recorder.set("queue_depth", queue_depth)
        self.recorder.set("rejected_requests", rejected_requests)
        self.recorder.set("oom_splits", oom_splits)
        self.recorder.set("client_gone_items", client_gone_items)
        return self.recorder.snapshot()


class RequestMetricsMiddleware:
    """ASGI middleware: ``requests{route, status}`` and ``request_duration_seconds{route}``.

    ``route`` is the path template of the matched route (FastAPI leaves it in ``scope["route"]``), or
    ``other`` for paths the app does not serve. A request whose handler is cancelled because its client went
    away before the answer counts as ``499`` (client closed request), never as a 5xx.
    """

    def __init__(self, app: ASGIApp, recorder: MetricsRecorder):
        self.app = app
        self.recorder = recorder

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app fails before it starts a response, the server answers 500

        async def send_recording_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording_status)
        except asyncio.CancelledError:
            status = CLIENT_CLOSED_REQUEST
            log.info("client closed the request to %s before the answer", scope.get("path"))
            raise
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
            self.recorder.inc("requests", route=route, status=str(status))
            self.recorder.observe("request_duration_seconds", time.perf_counter() - started, route=route)
