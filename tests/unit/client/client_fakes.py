"""Helpers for the client unit tests: an in-memory fake of the rmserve HTTP API behind httpx.MockTransport.

No sockets: every request goes to ``FakeServer.handle`` (sync) or ``FakeServer.handle_async``.
The fake's reward for a response is a number parsed from its text (``"r17"`` -> 17.0, else its
length), so a test can tell from the numbers alone whether results came back in input order.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from rmserve.client import AsyncRewardClient, RewardClient

URL = "http://rm.test"


def reward_of(response: str) -> float:
    match = re.fullmatch(r"r(-?\d+)", response)
    return float(match.group(1)) if match else float(len(response))


class FakeServer:
    """Answers API.md's routes from the request alone; records every request it saw.

    ``delay(request_body) -> seconds`` lets a test make some chunks slower than others;
    ``truncate_local`` lists the chunk-local indices the fake reports as truncated.
    """

    def __init__(self, delay: Callable[[dict], float] | None = None, truncate_local: tuple[int, ...] = ()) -> None:
        self.requests: list[httpx.Request] = []
        self.bodies: list[Any] = []
        self.completed: list[int] = []  # first global index of each answered chunk, in completion order
        self.in_flight = 0
        self.max_in_flight = 0
        self._delay = delay or (lambda body: 0.0)
        self._truncate_local = truncate_local
        self._lock = threading.Lock()

    def _enter(self, request: httpx.Request) -> Any:
        body = json.loads(request.content) if request.content else None
        with self._lock:
            self.requests.append(request)
            self.bodies.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return body

    def _leave(self, body: Any) -> None:
        with self._lock:
            self.in_flight -= 1
            if isinstance(body, dict) and body.get("items") and "response" in body["items"][0]:
                self.completed.append(int(reward_of(body["items"][0]["response"])))

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = self._enter(request)
        try:
            time.sleep(self._delay(body) if body else 0.0)
            return self.answer(request, body)
        finally:
            self._leave(body)

    async def handle_async(self, request: httpx.Request) -> httpx.Response:
        body = self._enter(request)
        try:
            await asyncio.sleep(self._delay(body) if body else 0.0)
            return self.answer(request, body)
        finally:
            self._leave(body)

    def answer(self, request: httpx.Request, body: Any) -> httpx.Response:
        path = request.url.path
        if path in ("/health", "/ready"):
            return httpx.Response(200, json={"status": "ok"})
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake-rm", "dtype": "float32", "max_length": 512}]})
        if path == "/v1/score":
            items = body["items"]
            rewards = [reward_of(item["response"]) for item in items]
            truncated = [i for i in self._truncate_local if i < len(items)]
            return httpx.Response(
                200,
                json={
                    "model": "fake-rm",
                    "rewards": rewards,
                    "truncated": truncated,
                    "usage": {"input_tokens": 10 * len(items)},
                },
            )
        if path == "/v1/preference":
            results = []
            for pair in body["pairs"]:
                a, b = reward_of(pair["response_a"]), reward_of(pair["response_b"])
                prob_a = 1.0 / (1.0 + math.exp(b - a))
                results.append({"reward_a": a, "reward_b": b, "prob_a": prob_a, "preferred": "a" if a >= b else "b"})
            return httpx.Response(200, json={"model": "fake-rm", "results": results})
        if path == "/v1/rerank":
            results = []
            for group in body["groups"]:
                rewards = [reward_of(r) for r in group["responses"]]
                order = sorted(range(len(rewards)), key=lambda i: -rewards[i])[: body.get("top_k") or None]
                ranking = [{"index": i, "reward": rewards[i]} for i in order]
                results.append({"ranking": ranking, "best_index": order[0]})
            return httpx.Response(200, json={"model": "fake-rm", "results": results})
        return httpx.Response(404, json={"detail": "Not Found"})


class Sleeps(list):
    """Records requested sleeps instead of sleeping; usable as the sync and the async ``sleep``."""

    def sync(self, seconds: float) -> None:
        self.append(seconds)

    async def async_(self, seconds: float) -> None:
        self.append(seconds)


def make_client(mode: str, handler: Callable | FakeServer, *, sleeps: Sleeps | None = None, **kwargs: Any):
    """A RewardClient (``mode="sync"``) or AsyncRewardClient (``"async"``) whose transport is ``handler``.

    Sleeps are recorded in ``sleeps`` instead of taken; the jitter RNG is fixed at 0.5 unless given.
    """
    sleeps = sleeps if sleeps is not None else Sleeps()
    if isinstance(handler, FakeServer):
        handler = handler.handle if mode == "sync" else handler.handle_async
    kwargs.setdefault("rng", lambda: 0.5)
    if mode == "sync":
        http = httpx.Client(transport=httpx.MockTransport(handler))
        return RewardClient(URL, http_client=http, sleep=sleeps.sync, **kwargs)
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return AsyncRewardClient(URL, http_client=http, sleep=sleeps.async_, **kwargs)


def call(client: RewardClient | AsyncRewardClient, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call a client method the same way for both clients (the async one on a fresh event loop)."""
    result = getattr(client, method)(*args, **kwargs)
    if isinstance(client, AsyncRewardClient):
        return asyncio.run(result)
    return result
