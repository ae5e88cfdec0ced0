"""The one pipeline every scoring endpoint runs, without HTTP: pre-process → find the model → score (one call to the
model's scoring core) → post-process.

``GatewayService.run(endpoint, request, context)`` turns the request into one flat list of items with the endpoint's
own step (``endpoint.call``: ``native.py``, ``compat.py``), finds the model its ``model`` names (``model_routing``),
sends the items to that model's scoring core through its ``ScorerLink`` (in this process, or a Scorer deployment
through Ray, where the Gateway merges the calls of concurrent requests, ``rayserve.coalescing``; the core's one queue
batches them with everyone else's), and builds the response from the rewards (``endpoint.respond``). An ensemble
sends one call to each member at once and combines their normalised rewards (``ensemble.combine_rewards``).

Example::

    service = GatewayService([LocalLink(core)], config)       # or RayLink(scorer_handle, config)
    await service.run(ENDPOINTS[0], ScoreRequest(items=[{"prompt": "2+2?", "response": "4"}]), Context(service))
"""

from __future__ import annotations

import asyncio
import inspect
from collections import deque
from collections.abc import Sequence

from pydantic import BaseModel

from rmserve.model.errors import (
    ModelNotFoundError,
    NotReadyError,
    OverloadedError,
    RequestTooLargeError,
    RMServeError,
    WrongModelKindError,
)
from rmserve.model.items import Item
from rmserve.serve.config.settings import ServerConfig
from rmserve.serve.edge.locations import Locate
from rmserve.serve.edge.pipeline import Context, Endpoint
from rmserve.serve.edge.protocol import (
    ModelCard,
    ModelsResponse,
    ReadyResponse,
    ScoredItems,
)
from rmserve.serve.metrics.telemetry import RewardTelemetry
from rmserve.serve.routing.ensemble import combine_rewards
from rmserve.serve.routing.model_routing import EnsembleRoute, ModelLane, ModelRouter, ScorerLink

READY_PROBE_TIMEOUT_S = 2.0  # at most; never more than half the request deadline


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
    """The scoring pipeline (``run``) and the operational answers on top of each served model's ``ScorerLink``.

    ``links`` are in ``config.served_models()`` order (the first is the default model). ``telemetry`` sees every
    answer (``telemetry.py``).
    """

    def __init__(self, links: Sequence[ScorerLink], config: ServerConfig, telemetry: RewardTelemetry | None = None):
        self.config = config
        self.router = ModelRouter(links, config)
        self.capacity = CapacitySignal()
        self.telemetry = telemetry

    # -- the pipeline ---------------------------------------------------------------------------------
    async def run(self, endpoint: Endpoint, request: BaseModel, context: Context) -> BaseModel:
        """One request of ``endpoint``, validated: its items scored by the model it names, its response built."""
        call = endpoint.call(request, context)
        if inspect.isawaitable(call):
            call = await call
        target = await self.resolve(call.model)
        check_kind(endpoint, target)
        if not call.items:  # an empty list where a trainer may send one: the model is checked, nothing is scored
            scored = ScoredItems(model=name_of(target), rewards=[])
        elif endpoint.when_full == "wait":
            scored = await self._score_waiting_for_room(target, call.items, call.normalize, call.locate)
        else:  # a judge's label probabilities are not its rewards: reward telemetry does not see them
            observe = endpoint.kind != "judge"
            scored = await self.score_items(target, call.items, call.normalize, call.locate, observe=observe)
        return endpoint.respond(request, scored, call)

    async def _score_waiting_for_room(
        self, target: ModelLane | EnsembleRoute, items: Sequence[Item], normalize: bool, locate: Locate
    ) -> ScoredItems:
        """``score_items``, where a full queue is waited out (up to the request's deadline), not answered 429."""
        while True:
            try:
                return await self.score_items(target, items, normalize, locate)
            except OverloadedError:
                await self.capacity.wait(float(self.config.limits.retry_after_s))

    # -- operational ------------------------------------------------------------------------------------
    async def models(self) -> ModelsResponse:
        cards = []
        for lane in self.router.lanes:
            info = await self._probe(lane)
            cards.append(ModelCard.model_validate({**info, "names": lane.names}))
        for ensemble in self.router.ensembles.values():
            cards.append(ensemble_card(ensemble, [lane.info or {} for lane in ensemble.lanes]))
        return ModelsResponse(data=cards)

    async def ready(self) -> ReadyResponse:
        infos = [await self._probe(lane) for lane in self.router.lanes]
        return ReadyResponse(model=infos[0]["id"])

    # -- steps --------------------------------------------------------------------------------------
    async def resolve(self, model: str | None) -> ModelLane | EnsembleRoute:
        """The lane or ensemble ``model`` names, its models probed (``NotReadyError`` while one is not loaded);
        ``ModelNotFoundError`` (404, ``param="model"``) when nothing served has that name."""
        for lane in self.router.unknown_lanes():  # a single unnamed model's id is its checkpoint's
            await self._probe(lane)
        target = self.router.find(model)
        if target is None and model is not None and self.router.unprobed_lanes():
            for lane in self.router.unprobed_lanes():  # a probe teaches a lane its resolved checkpoint directory
                await self._probe(lane)
            target = self.router.find(model)
        if target is None:
            raise ModelNotFoundError(
                f"model {model!r} is not served here; use one of {self.router.all_names()}", param="model"
            )
        for lane in target.lanes if isinstance(target, EnsembleRoute) else [target]:
            if lane.info is None:
                await self._probe(lane)
        return target

    async def card(self, model: str | None) -> dict | None:
        """The card of the one model ``model`` names (``GET /v1/models``' entry); None for an ensemble."""
        target = await self.resolve(model)
        return None if isinstance(target, EnsembleRoute) else target.info

    async def score_items(
        self,
        target: ModelLane | EnsembleRoute,
        items: Sequence[Item],
        normalize: bool,
        locate: Locate,
        *,
        observe: bool = True,
    ) -> ScoredItems:
        """One Scorer call per model of ``target`` (``resolve``) for a request's flat item list (an ensemble calls its
        members concurrently); an item's error names the caller's field (``locate``); reward telemetry sees the
        rewards when ``observe``."""
        limit = self.config.limits.max_items_per_request
        if len(items) > limit:
            raise RequestTooLargeError(f"{len(items)} items exceed the limit of {limit} per request")
        if isinstance(target, EnsembleRoute):
            scored = await self._score_ensemble(target, items, locate)
        else:
            scored = await self._score_lane(target, items, normalize, locate)
        lanes = target.lanes if isinstance(target, EnsembleRoute) else [target]
        scored.batch_invariant = all((lane.info or {}).get("batch_invariant", False) for lane in lanes)
        if self.telemetry is not None and observe:
            # a process reward model's item counts with its last step's reward
            rewards = [r[-1] if isinstance(r, list) else r for r in scored.rewards]
            self.telemetry.observe(scored.model, rewards, scored.lengths, len(scored.truncated), scored.spread)
        return scored

    async def special_tokens(self, model: str | None) -> dict:
        """The tokenizer's special tokens of the model ``model`` names (an ensemble's: its first member's)."""
        target = await self.resolve(model)
        lane = target.lanes[0] if isinstance(target, EnsembleRoute) else target
        if lane.special_tokens is None:
            try:
                lane.special_tokens = await asyncio.wait_for(lane.link.special_tokens(), self._probe_timeout())
            except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
                raise NotReadyError("the model is not loaded yet; GET /ready turns 200 when it is") from None
        return lane.special_tokens

    async def _score_lane(self, lane: ModelLane, items: Sequence[Item], normalize: bool, locate: Locate) -> ScoredItems:
        result = await lane.link.score(items, normalize)
        if not isinstance(result, OverloadedError):  # its items were admitted and have left the queue now
            self.capacity.freed(len(items))
        if isinstance(result, RMServeError):
            if result.index is not None:
                result.relocate(locate(result.index, result.field))
            raise result
        return result

    async def _score_ensemble(self, ensemble: EnsembleRoute, items: Sequence[Item], locate: Locate) -> ScoredItems:
        """Every member scores the items at once (each through its own Scorer queue), normalised; then combine."""
        calls = [self._score_lane(lane, items, True, locate) for lane in ensemble.lanes]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        members: list[ScoredItems] = list(outcomes)  # type: ignore[arg-type]
        combined = combine_rewards(
            ensemble.config,
            {member: scored.shown for member, scored in zip(ensemble.config.members, members, strict=True)},
        )
        return ScoredItems(
            model=ensemble.name,
            rewards=combined.rewards,
            truncated=sorted({i for scored in members for i in scored.truncated}),
            input_tokens=sum(scored.input_tokens for scored in members),
            lengths=members[0].lengths,
            member_rewards=combined.members,
            spread=combined.spread,
        )

    def _probe_timeout(self) -> float:
        return min(READY_PROBE_TIMEOUT_S, self.config.limits.request_timeout_s / 2)

    async def _probe(self, lane: ModelLane) -> dict:
        """The model card, from a Scorer replica within a short timeout, else ``NotReadyError``."""
        try:
            info = await asyncio.wait_for(lane.link.info(), self._probe_timeout())
        except asyncio.TimeoutError:
            raise NotReadyError("the model is not loaded yet; GET /ready turns 200 when it is") from None
        lane.learn(info)
        return info


def name_of(target: ModelLane | EnsembleRoute) -> str:
    """The id of the model, or the ensemble's name, a request was resolved to."""
    return target.name if isinstance(target, EnsembleRoute) else str(target.model_id)


def check_kind(endpoint: Endpoint, target: ModelLane | EnsembleRoute) -> None:
    """A 400 (``param="model"``) when ``target`` is not of the kind ``endpoint`` serves: an outcome route on a process
    reward model, a step route on an outcome reward model, or a judge's route (label probabilities) on a model that is
    not a judge (an ensemble is not one)."""
    lanes = target.lanes if isinstance(target, EnsembleRoute) else [target]
    for lane in lanes:
        kind = (lane.info or {}).get("kind", "outcome")
        judge = (lane.info or {}).get("judge") is not None and not isinstance(target, EnsembleRoute)
        if endpoint.kind in (kind, "judge" if judge else kind):
            continue
        name = target.name if isinstance(target, EnsembleRoute) else lane.model_id
        if endpoint.kind == "judge":
            message = (
                f"model {name!r} is not a judge: {endpoint.paths[0]} with label_token_ids needs a causal LM served "
                "with verdict_tokens"
            )
        elif kind == "process":
            message = f"model {name!r} is a process reward model: it answers POST /v1/steps and /pooling only"
        else:
            message = f"model {name!r} is an outcome reward model: {endpoint.paths[0]} needs a process reward model"
        raise WrongModelKindError(message, param="model")


def ensemble_card(ensemble: EnsembleRoute, infos: Sequence[dict]) -> ModelCard:
    """The ``/v1/models`` entry of an ensemble: what its members share (else ``"mixed"``), the shortest
    ``max_length``, no normalisation (its rewards are already normalised), and its definition."""

    def shared(key: str) -> str:
        values = {str(info.get(key)) for info in infos}
        return values.pop() if len(values) == 1 else "mixed"

    config = ensemble.config
    return ModelCard(
        id=config.name,
        names=[config.name],
        dtype=shared("dtype"),
        quantization=shared("quantization"),
        max_length=min(int(info.get("max_length", 0)) for info in infos),
        head="ensemble",
        normalization=None,
        template=shared("template"),
        batch_invariant=all(info.get("batch_invariant", False) for info in infos),
        ensemble={"members": dict(config.members), "combine": config.combine, "lambda": config.lambda_},
    )
