"""What the Gateway's routes do, without HTTP: validate → preprocess → run (one Scorer call) → build the response.

Each native route turns its request into one flat list of items, sends them to the Scorer in ONE
handle call (shared with the other requests that reached this Gateway in the same event-loop turn, see
``coalescing``; the Scorer's one queue batches them with everyone else's), and builds its response from the rewards.
The response-building steps are pure functions (``preference_result``, ``rank_group``).

Example::

    service = GatewayService(scorer_handle, config)
    await service.score(ScoreRequest(items=[{"prompt": "2+2?", "response": "4"}]))
"""

from __future__ import annotations

import asyncio
import math
import os
from collections import deque
from collections.abc import Sequence
from typing import Any

from rmserve.model.errors import (
    ModelNotFoundError,
    NotReadyError,
    OverloadedError,
    RequestTooLargeError,
    RMServeError,
)
from rmserve.model.items import Item, PairItem

from .coalescing import RequestCoalescer
from .config import ServerConfig
from .locations import Locate, in_groups, in_items, in_pairs
from .protocol import (
    ModelCard,
    ModelsResponse,
    PreferenceRequest,
    PreferenceResponse,
    PreferenceResult,
    RankedResponse,
    ReadyResponse,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoredItems,
    ScoreRequest,
    ScoreResponse,
    Usage,
)

READY_PROBE_TIMEOUT_S = 2.0  # at most; never more than half the request deadline


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def preference_result(raw_a: float, raw_b: float, shown_a: float, shown_b: float) -> PreferenceResult:
    """Bradley–Terry ``P(a ≻ b) = σ(r_a − r_b)`` from raw rewards; ties prefer ``a``."""
    return PreferenceResult(
        reward_a=shown_a, reward_b=shown_b, prob_a=sigmoid(raw_a - raw_b), preferred="a" if raw_a >= raw_b else "b"
    )


def rank_group(rewards: list[float], top_k: int | None) -> RerankResult:
    """Indices by reward, best first; equal rewards keep input order (``sorted`` is stable)."""
    order = sorted(range(len(rewards)), key=lambda i: -rewards[i])
    ranking = [RankedResponse(index=i, reward=rewards[i]) for i in order[:top_k]]
    return RerankResult(ranking=ranking, best_index=order[0])


def model_names(config: ServerConfig, model_id: str) -> list[str]:
    """Every name a request's ``model`` may use (API.md, "Model names"): the model's id, the operator's
    ``served_model_names``, and the path it was loaded from, as given and resolved (verl sends its path)."""
    path = config.model.path
    names = [model_id, *config.served_model_names, path]
    if path != "demo":
        names.append(os.path.realpath(os.path.expanduser(path)))
    return list(dict.fromkeys(names))


def names_model(names: Sequence[str], requested: str) -> bool:
    """Does ``requested`` name the model? A path matches with or without a trailing slash or ``./``."""
    return requested in names or os.path.normpath(requested) in {os.path.normpath(n) for n in names}


class CapacitySignal:
    """Wakes requests waiting for room in the Scorer's queue when this Gateway's requests finish.

    ``freed(n)`` wakes the ``n`` longest waiters (one finished item makes room for one); a waiter also wakes
    after ``timeout`` (room freed by other Gateways is not seen here).
    """

    def __init__(self) -> None:
        self._waiters: deque[asyncio.Future] = deque()

    async def wait(self, timeout: float) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            if not waiter.done():
                waiter.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def freed(self, items: int) -> None:
        woken = 0
        while self._waiters and woken < items:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                woken += 1


class GatewayService:
    """The native routes' pipeline on top of a Scorer ``DeploymentHandle``."""

    def __init__(self, scorer: Any, config: ServerConfig):
        self.scorer = scorer
        self.config = config
        self._model_id: str | None = None
        self._model_names: list[str] = []
        self.capacity = CapacitySignal()
        self.coalescer = RequestCoalescer(
            scorer,
            window_s=config.batching.gateway_window_s,
            max_items=config.batching.max_batch_items,
            merge=config.replicas == 1,  # a withdrawal must reach the replica that holds the request
        )

    # -- routes -------------------------------------------------------------------------------------
    async def score(self, request: ScoreRequest) -> ScoreResponse:
        scored = await self.score_items(list(request.items), request.normalize, request.model, in_items)
        return ScoreResponse(
            model=scored.model,
            rewards=scored.shown,
            truncated=scored.truncated,
            usage=Usage(input_tokens=scored.input_tokens),
        )

    async def preference(self, request: PreferenceRequest) -> PreferenceResponse:
        items = []
        for pair in request.pairs:
            items += [PairItem(prompt=pair.prompt, response=pair.response_a)]
            items += [PairItem(prompt=pair.prompt, response=pair.response_b)]
        scored = await self.score_items(items, request.normalize, request.model, in_pairs)
        raw, shown = scored.rewards, scored.shown
        results = [preference_result(raw[k], raw[k + 1], shown[k], shown[k + 1]) for k in range(0, len(raw), 2)]
        return PreferenceResponse(model=scored.model, results=results)

    async def rerank(self, request: RerankRequest) -> RerankResponse:
        items = [PairItem(prompt=g.prompt, response=r) for g in request.groups for r in g.responses]
        locate = in_groups([len(g.responses) for g in request.groups])
        scored = await self.score_items(items, request.normalize, request.model, locate)
        results, start = [], 0
        for group in request.groups:
            end = start + len(group.responses)
            results.append(rank_group(scored.shown[start:end], request.top_k))
            start = end
        return RerankResponse(model=scored.model, results=results)

    async def models(self) -> ModelsResponse:
        info = await self._probe()
        return ModelsResponse(data=[ModelCard.model_validate({**info, "names": self._model_names})])

    async def ready(self) -> ReadyResponse:
        info = await self._probe()
        return ReadyResponse(model=info["id"])

    # -- steps --------------------------------------------------------------------------------------
    async def check_model(self, model: str | None) -> str:
        """The served model's id; ``ModelNotFoundError`` (404, ``param="model"``) when ``model`` names another."""
        model_id = self._model_id or (await self._probe())["id"]
        if model is not None and not names_model(self._model_names, model):
            raise ModelNotFoundError(
                f"model {model!r} is not served here; use one of {self._model_names}", param="model"
            )
        return model_id

    async def score_items(
        self, items: Sequence[Item], normalize: bool, model: str | None, locate: Locate
    ) -> ScoredItems:
        """One Scorer call for a request's flat item list; an item's error names the caller's field (``locate``)."""
        limit = self.config.limits.max_items_per_request
        if len(items) > limit:
            raise RequestTooLargeError(f"{len(items)} items exceed the limit of {limit} per request")
        await self.check_model(model)
        result = await self.coalescer.submit(items, normalize)
        if not isinstance(result, OverloadedError):  # its items were admitted and have left the queue now
            self.capacity.freed(len(items))
        if isinstance(result, RMServeError):
            if result.index is not None:
                result.relocate(locate(result.index, result.field))
            raise result
        return result

    async def _probe(self) -> dict:
        """The model card, from a Scorer replica within a short timeout, else ``NotReadyError``."""
        try:
            timeout = min(READY_PROBE_TIMEOUT_S, self.config.limits.request_timeout_s / 2)
            info = await self._call("info", timeout=timeout)
        except asyncio.TimeoutError:
            raise NotReadyError("the model is not loaded yet; GET /ready turns 200 when it is") from None
        self._model_id = info["id"]
        self._model_names = model_names(self.config, info["id"])
        return info

    async def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """One Scorer handle call; on timeout or cancellation the call is cancelled in the replica too."""
        response = getattr(self.scorer, method).remote(*args)
        try:
            return await asyncio.wait_for(_resolve(response), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            response.cancel()
            raise


async def _resolve(response: Any) -> Any:
    return await response
