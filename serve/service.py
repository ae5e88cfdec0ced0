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
from typing import Any

from rmserve.model.errors import InvalidRequestError, NotReadyError, RequestTooLargeError, RMServeError
from rmserve.model.items import PairItem

from .coalescing import RequestCoalescer
from .config import ServerConfig
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


class GatewayService:
    """The native routes' pipeline on top of a Scorer ``DeploymentHandle``."""

    def __init__(self, scorer: Any, config: ServerConfig):
        self.scorer = scorer
        self.config = config
        self._model_id: str | None = None
        self.coalescer = RequestCoalescer(
            scorer,
            window_s=config.batching.gateway_window_s,
            max_items=config.batching.max_batch_items,
            merge=config.replicas == 1,  # a withdrawal must reach the replica that holds the request
        )

    # -- routes -------------------------------------------------------------------------------------
    async def score(self, request: ScoreRequest) -> ScoreResponse:
        scored = await self._run(list(request.items), request.normalize, request.model)
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
        scored = await self._run(items, request.normalize, request.model)
        raw, shown = scored.rewards, scored.shown
        results = [preference_result(raw[k], raw[k + 1], shown[k], shown[k + 1]) for k in range(0, len(raw), 2)]
        return PreferenceResponse(model=scored.model, results=results)

    async def rerank(self, request: RerankRequest) -> RerankResponse:
        items = [PairItem(prompt=g.prompt, response=r) for g in request.groups for r in g.responses]
        scored = await self._run(items, request.normalize, request.model)
        results, start = [], 0
        for group in request.groups:
            end = start + len(group.responses)
            results.append(rank_group(scored.shown[start:end], request.top_k))
            start = end
        return RerankResponse(model=scored.model, results=results)

    async def models(self) -> ModelsResponse:
        info = await self._probe()
        return ModelsResponse(data=[ModelCard.model_validate(info)])

    async def ready(self) -> ReadyResponse:
        info = await self._probe()
        return ReadyResponse(model=info["id"])

    # -- steps --------------------------------------------------------------------------------------
    async def _run(self, items: list, normalize: bool, model: str | None) -> ScoredItems:
        limit = self.config.limits.max_items_per_request
        if len(items) > limit:
            raise RequestTooLargeError(f"{len(items)} items exceed the limit of {limit} per request")
        model_id = self._model_id or (await self._probe())["id"]
        if model is not None and model != model_id:
            raise InvalidRequestError(f"model {model!r} is not served here; this one is {model_id!r}", param="model")
        result = await self.coalescer.submit(items, normalize)
        if isinstance(result, RMServeError):
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
