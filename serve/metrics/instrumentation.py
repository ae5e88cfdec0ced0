"""Where the metrics of ``metrics.py`` are recorded: the Scorer's hooks and the Gateway's HTTP middleware.

Neither needs Ray. A Scorer replica keeps each of its numbers in one place: what the engine did (forward tokens,
OOM splits, prefix sharing and the caches) in the engine's ``EngineStats``, everything else (requests, items,
batches, rejections, forward latencies) in ``ScorerMetrics``. Both ``/metrics`` (``snapshot``, which reads the
engine's totals through ``engine_counters``) and ``Scorer.stats()`` (``counts``, from the same snapshot) derive
from those stores; no number is counted twice.

Example::

    metrics = ScorerMetrics(model.info())
    model.engine.observers.append(metrics.on_forward)      # forward passes (latency)
    metrics.on_batch([12, 30], padded_tokens=64)           # a batch ran: its sizes, its padded tokens (the engine's)
    metrics.on_request(items=4, input_tokens=120, truncated=0)
    snapshot = metrics.snapshot(queue_depth=0, engine_counters=model.engine.counters())
    metrics.counts(snapshot)                               # what stats() shows
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from rmserve.serve.metrics.store import MetricsRecorder, Snapshot

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]
UNMATCHED_ROUTE = "other"  # requests to paths the app does not serve share one label (bounded cardinality)
RECENT_BATCHES = 1024  # batch sizes kept for ``counts()["batching"]["recent_batch_sizes"]``
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer; not a server error
log = logging.getLogger("rmserve.serve")


class ScorerMetrics:
    """The numbers of one Scorer replica that the engine does not keep: Prometheus metrics plus a few counters
    only ``stats()`` shows."""

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
        self.model_id = model_info["id"]
        self.recorder.set("sleep_level", 0, model=self.model_id)
        self._lock = threading.Lock()  # the forward thread and the event loop both count
        self._recent_batches: deque[int] = deque(maxlen=RECENT_BATCHES)
        self._rescored_batches = 0  # batches that failed as a whole and were rescored item by item
        self._gateway_calls = 0  # score_requests calls (each carries the requests a Gateway merged)
        self._gateway_requests = 0

    def on_forward(self, rows: int, padded_tokens: int, real_tokens: int, seconds: float) -> None:
        """``ScoringEngine`` observer: one forward pass (micro-batch). Its tokens are counted by the engine
        (``EngineStats``) alone; here only its latency."""
        self.recorder.observe("forward_duration_seconds", seconds)

    def on_batch(self, lengths: Sequence[int], padded_tokens: int) -> None:
        """A batch ran: its size, and the padded tokens its forwards computed (read from the engine's totals, so
        the distribution and the total come from one count)."""
        self.recorder.observe("batch_size_items", len(lengths))
        self.recorder.observe("batch_padded_tokens", padded_tokens)
        with self._lock:
            self._recent_batches.append(len(lengths))

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

    def on_sleep_transition(self, transition: str, level: int, seconds: float) -> None:
        """The replica fell asleep at ``level`` (``transition`` ``sleep``) or woke up from it (``wake``)."""
        self.recorder.set("sleep_level", level if transition == "sleep" else 0, model=self.model_id)
        self.recorder.observe(
            "sleep_transition_seconds", seconds, model=self.model_id, transition=transition, level=str(level)
        )

    def on_rescored_batch(self) -> None:
        with self._lock:
            self._rescored_batches += 1

    def on_gateway_call(self, requests: int) -> None:
        with self._lock:
            self._gateway_calls += 1
            self._gateway_requests += requests

    def snapshot(self, *, queue_depth: int, engine_counters: dict[str, float] | None = None) -> Snapshot:
        """The replica's metrics: this store's, the queue depth and the engine's totals (``engine_counters``:
        ``ScoringEngine.counters()``, keyed by metric name, read from the engine's own store)."""
        snapshot = self.recorder.snapshot()
        snapshot.set("queue_depth", queue_depth)
        for name, value in (engine_counters or {}).items():
            snapshot.set(name, value)
        return snapshot

    def counts(self, snapshot: Snapshot) -> dict:
        """What ``Scorer.stats()`` reports besides the engine's totals, from ``snapshot`` (this store's) and the
        counters only ``stats()`` shows."""
        sizes = snapshot.histogram("batch_size_items")
        with self._lock:
            recent = list(self._recent_batches)
            rescored, calls, requests = self._rescored_batches, self._gateway_calls, self._gateway_requests
        return {
            "rejected_requests": int(snapshot.get("rejected_requests")),
            "client_gone_items": int(snapshot.get("client_gone_items")),
            "rescored_batches": rescored,
            "gateway_calls": {"calls": calls, "requests": requests},
            "batching": {"batches": sizes.count, "items": int(sizes.sum), "recent_batch_sizes": recent},
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
