"""Helpers for the client unit tests: an in-memory fake of the rmserve HTTP API behind httpx.MockTransport.

No sockets: every request goes to ``FakeServer.handle`` (sync) or ``FakeServer.handle_async``.
The fake's reward for a response is a number parsed from its text (``"r17"`` -> 17.0, else its
length), so a test can tell from the numbers alone whether results came back in input order. A request
for the model ``ENSEMBLE`` also gets the ensemble fields, from the same numbers (``member_rewards_of``).
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
ENSEMBLE = "fake-ensemble"  # the fake's ensemble; its members are "up" and "down" (member_rewards_of)


def reward_of(response: str) -> float:
    match = re.fullmatch(r"r(-?\d+)", response)
    return float(match.group(1)) if match else float(len(response))


def member_rewards_of(response: str) -> dict[str, float]:
    """The fake ensemble's members' rewards for a response: ``up`` is its reward, ``down`` one minus it."""
    reward = reward_of(response)
    return {"up": reward, "down": 1.0 - reward}


def spread_of(response: str) -> float:
    """The (equal-weight, population) spread of ``member_rewards_of(response)``."""
    return abs(2.0 * reward_of(response) - 1.0) / 2.0


def later_chunks_finish_first(n_items: int, base: float):
    """A ``FakeServer`` delay: the chunk starting at item k sleeps longer the earlier it is (reversed completion)."""
    return lambda body: base * (n_items - reward_of(body["items"][0]["response"])) / n_items if "items" in body else 0


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
        model = body.get("model", "fake-rm")
        ensemble = model == ENSEMBLE
        if path == "/v1/score":
            items = body["items"]
            rewards = [reward_of(item["response"]) for item in items]
            truncated = [i for i in self._truncate_local if i < len(items)]
            answer = {
                "model": model,
                "rewards": rewards,
                "truncated": truncated,
                "usage": {"input_tokens": 10 * len(items)},
            }
            if ensemble:
                answer.update(_ensemble_fields([item["response"] for item in items]))
            return httpx.Response(200, json=answer)
        if path == "/v1/preference":
            results = []
            for pair in body["pairs"]:
                a, b = reward_of(pair["response_a"]), reward_of(pair["response_b"])
                prob_a = 1.0 / (1.0 + math.exp(b - a))
                result = {"reward_a": a, "reward_b": b, "prob_a": prob_a, "preferred": "a" if a >= b else "b"}
                if ensemble:
                    for side in ("a", "b"):
                        result[f"member_rewards_{side}"] = member_rewards_of(pair[f"response_{side}"])
                        result[f"spread_{side}"] = spread_of(pair[f"response_{side}"])
                results.append(result)
            return httpx.Response(200, json={"model": model, "results": results})
        if path == "/v1/rerank":
            results = []
            for group in body["groups"]:
                rewards = [reward_of(r) for r in group["responses"]]
                order = sorted(range(len(rewards)), key=lambda i: -rewards[i])[: body.get("top_k") or None]
                ranking = [{"index": i, "reward": rewards[i]} for i in order]
                result = {"ranking": ranking, "best_index": order[0]}
                if ensemble:
                    result.update(_ensemble_fields(group["responses"]))  # in the group's input order
                results.append(result)
            return httpx.Response(200, json={"model": model, "results": results})
        return httpx.Response(404, json={"detail": "Not Found"})


def _ensemble_fields(responses: list[str]) -> dict[str, Any]:
    members = [member_rewards_of(r) for r in responses]
    return {
        "member_rewards": {name: [m[name] for m in members] for name in ("up", "down")},
        "spread": [spread_of(r) for r in responses],
    }


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
