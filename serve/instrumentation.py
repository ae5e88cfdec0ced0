"""Where the metrics of ``metrics.py`` are recorded: the Scorer's hooks and the Gateway's HTTP middleware.

Neither needs Ray. ``ScorerMetrics`` is the one store of a Scorer replica's numbers: the engine's micro-batch
observer, the forward thread's batch callback and the request path feed it; it serves both ``/metrics`` (its
``snapshot``) and ``Scorer.stats()`` (its ``counts``). Only the engine's own totals (``EngineStats``) live elsewhere.

Example::

    metrics = ScorerMetrics(model.info())
    model.engine.observers.append(metrics.on_forward)      # forward passes
    metrics.on_batch([12, 30])                             # a batch ran (after its forward passes)
    metrics.on_request(items=4, input_tokens=120, truncated=0)
    metrics.snapshot(queue_depth=0, oom_splits=0)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from .metrics import MetricsRecorder, Snapshot

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]
UNMATCHED_ROUTE = "other"  # requests to paths the app does not serve share one label (bounded cardinality)
RECENT_BATCHES = 1024  # batch sizes kept for ``counts()["batching"]["recent_batch_sizes"]``
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer; not a server error
log = logging.getLogger("rmserve.serve")


class ScorerMetrics:
    """The numbers of one Scorer replica: Prometheus metrics plus a few counters only ``stats()`` shows."""

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
        self._lock = threading.Lock()  # the forward thread and the event loop both count
        self._recent_batches: deque[int] = deque(maxlen=RECENT_BATCHES)
        self._largest_batch = 0
        self._rescored_batches = 0  # batches that failed as a whole and were rescored item by item
        self._gateway_calls = 0  # score_requests calls (each carries the requests a Gateway merged)
        self._gateway_requests = 0

    def on_forward(self, rows: int, padded_tokens: int, real_tokens: int, seconds: float) -> None:
        """``ScoringEngine`` observer: one forward pass (micro-batch)."""
        self.recorder.observe("forward_duration_seconds", seconds)
        self.recorder.inc("forward_real_tokens", real_tokens)
        self.recorder.inc("forward_padded_tokens", padded_tokens)
        self._batch_padded_tokens += padded_tokens

    def on_batch(self, lengths: Sequence[int]) -> None:
        """A batch ran (its forward passes have all reported)."""
        self.recorder.observe("batch_size_items", len(lengths))
        self.recorder.observe("batch_padded_tokens", self._batch_padded_tokens)
        self._batch_padded_tokens = 0
        with self._lock:
            self._recent_batches.append(len(lengths))
            self._largest_batch = max(self._largest_batch, len(lengths))

    def on_request(self, items: int, input_tokens: int, truncated: int) -> None:
        """A request's items were scored (its rewards are about to be returned)."""
        self.recorder.inc("items_scored", items)
        self.recorder.inc("input_tokens", input_tokens)
        self.recorder.inc("truncated_items", truncated)

    def on_rejected(self) -> None:
        """A request was refused with 429 (the queue was full)."""
        self.recorder.inc("rejected_requests")

    def on_client_gone(self, items: int) -> None:
        """Items dropped before their forward pass because their caller went away."""
        if items:
            self.recorder.inc("client_gone_items", items)

    def on_rescored_batch(self) -> None:
        with self._lock:
            self._rescored_batches += 1

    def on_gateway_call(self, requests: int) -> None:
        with self._lock:
            self._gateway_calls += 1
            self._gateway_requests += requests

    def snapshot(
        self, *, queue_depth: int, oom_splits: int, engine_counters: dict[str, float] | None = None
    ) -> Snapshot:
        """The replica's metrics, with the values the Scorer and the engine hold themselves
        (``engine_counters``: ``ScoringEngine.cache_counters()``, keyed by metric name)."""
        self.recorder.set("queue_depth", queue_depth)
        self.recorder.set("oom_splits", oom_splits)
        for name, value in (engine_counters or {}).items():
            self.recorder.set(name, value)
        return self.recorder.snapshot()

    def counts(self) -> dict:
        """What ``Scorer.stats()`` reports from this store."""
        snap = self.recorder.snapshot()
        sizes = snap.histogram("batch_size_items")
        with self._lock:
            recent, largest = list(self._recent_batches), self._largest_batch
            rescored, calls, requests = self._rescored_batches, self._gateway_calls, self._gateway_requests
        return {
            "rejected_requests": int(snap.get("rejected_requests")),
            "client_gone_items": int(snap.get("client_gone_items")),
            "rescored_batches": rescored,
            "gateway_calls": {"calls": calls, "requests": requests},
            "batching": {
                "batches": sizes.count,
                "items": int(sizes.sum),
                "largest_batch": largest,
                "mean_batch_size": sizes.sum / sizes.count if sizes.count else 0.0,
                "recent_batch_sizes": recent,
            },
        }


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
