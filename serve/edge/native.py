"""The native endpoints' own steps (API.md): each request into one flat list of items (``Call``), and the rewards of
those items back into its response. ``endpoints.py`` puts them in the table the pipeline runs.

``/v1/steps`` sends each ``{prompt, steps}`` item as it is: the process reward model's formatter places the step
separators as token ids and reads a reward at each; left truncation may cut the first separators, so an item gets back
its last ``k`` step rewards, and the response puts ``null`` in front for the ``len(steps) - k`` it lost.

Example::

    call = score_call(ScoreRequest(items=[{"prompt": "2+2?", "response": "4"}]), context)
    score_response(request, ScoredItems(model="rmserve-demo", rewards=[0.7]), call)
"""

from __future__ import annotations

import math

from rmserve.model.items import JudgedPairItem, PairItem
from rmserve.serve.edge.locations import in_groups, in_items, in_judged_pairs, in_pairs
from rmserve.serve.edge.pipeline import Call, Context
from rmserve.serve.edge.protocol import (
    PreferenceRequest,
    PreferenceResponse,
    PreferenceResult,
    RankedResponse,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoredItems,
    ScoreRequest,
    ScoreResponse,
    StepResult,
    StepsRequest,
    StepsResponse,
    Usage,
)


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


def best_first(rewards: list[float]) -> list[int]:
    """Indices by reward, best first; equal rewards keep input order (``sorted`` is stable)."""
    return sorted(range(len(rewards)), key=lambda i: -rewards[i])


def rank_group(rewards: list[float], top_k: int | None) -> RerankResult:
    order = best_first(rewards)
    ranking = [RankedResponse(index=i, reward=rewards[i]) for i in order[:top_k]]
    return RerankResult(ranking=ranking, best_index=order[0])


# -- /v1/score ----------------------------------------------------------------------------------
def score_call(request: ScoreRequest, _context: Context) -> Call:
    return Call(list(request.items), in_items, request.model, request.normalize)


def score_response(_request: ScoreRequest, scored: ScoredItems, _call: Call) -> ScoreResponse:
    # A multi-attribute model's raw rewards carry every attribute (``heads.AttributedReward``)
    attributes = [getattr(r, "attributes", None) for r in scored.rewards]
    return ScoreResponse(
        attributes=attributes if attributes and all(a is not None for a in attributes) else None,
        model=scored.model,
        rewards=scored.shown,
        truncated=scored.truncated,
        usage=Usage(input_tokens=scored.input_tokens),
        batch_invariant=scored.batch_invariant,
        member_rewards=scored.member_rewards,
        spread=scored.spread,
    )


# -- /v1/preference: items 2k and 2k + 1 are pair k's two responses; a pairwise judge's item k is pair k --------
async def preference_call(request: PreferenceRequest, context: Context) -> Call:
    card = await context.service.card(request.model)
    if card is not None and card.get("judge") == "pairwise":  # one judge input per pair; its rewards are P(a > b)
        items = [
            JudgedPairItem(prompt=p.prompt, response_a=p.response_a, response_b=p.response_b) for p in request.pairs
        ]
        return Call(items, in_judged_pairs, request.model, model_card=card)
    items = []
    for pair in request.pairs:
        items += [PairItem(prompt=pair.prompt, response=pair.response_a)]
        items += [PairItem(prompt=pair.prompt, response=pair.response_b)]
    return Call(items, in_pairs, request.model, request.normalize)


def judged_pair_result(prob_a: float) -> PreferenceResult:
    """A pairwise judge's verdict: ``P(a ≻ b)`` is the first verdict token's probability; ``reward_a`` is it,
    ``reward_b`` its complement; ties prefer ``a``."""
    return PreferenceResult(
        reward_a=prob_a, reward_b=1.0 - prob_a, prob_a=prob_a, preferred="a" if prob_a >= 0.5 else "b"
    )


def preference_response(_request: PreferenceRequest, scored: ScoredItems, call: Call) -> PreferenceResponse:
    if call.model_card is not None and call.model_card.get("judge") == "pairwise":
        results = [judged_pair_result(p) for p in scored.rewards]
        return PreferenceResponse(model=scored.model, results=results, batch_invariant=scored.batch_invariant)
    raw, shown = scored.rewards, scored.shown
    results = [preference_result(raw[k], raw[k + 1], shown[k], shown[k + 1]) for k in range(0, len(raw), 2)]
    if scored.member_rewards is not None and scored.spread is not None:
        members, spread = scored.member_rewards, scored.spread
        for n, result in enumerate(results):
            result.member_rewards_a = {m: values[2 * n] for m, values in members.items()}
            result.member_rewards_b = {m: values[2 * n + 1] for m, values in members.items()}
            result.spread_a, result.spread_b = spread[2 * n], spread[2 * n + 1]
    return PreferenceResponse(model=scored.model, results=results, batch_invariant=scored.batch_invariant)


# -- /v1/rerank: one item per response, groups one after the other --------------------------------
def rerank_call(request: RerankRequest, _context: Context) -> Call:
    items = [PairItem(prompt=g.prompt, response=r) for g in request.groups for r in g.responses]
    locate = in_groups([len(g.responses) for g in request.groups])
    return Call(items, locate, request.model, request.normalize)


def rerank_response(request: RerankRequest, scored: ScoredItems, _call: Call) -> RerankResponse:
    results, start = [], 0
    for group in request.groups:
        end = start + len(group.responses)
        result = rank_group(scored.shown[start:end], request.top_k)
        if scored.member_rewards is not None and scored.spread is not None:
            result.member_rewards = {m: values[start:end] for m, values in scored.member_rewards.items()}
            result.spread = scored.spread[start:end]
        results.append(result)
        start = end
    return RerankResponse(model=scored.model, results=results, batch_invariant=scored.batch_invariant)


# -- /v1/steps: one item per {prompt, steps}; its step rewards, one per separator left truncation kept ------------
def aggregate_steps(rewards: list[float], how: str) -> float | None:
    """An item's reward from its (non-null) step rewards: ``min``, ``prod``, ``last`` or ``mean``; None when none."""
    if not rewards:
        return None
    if how == "min":
        return min(rewards)
    if how == "last":
        return rewards[-1]
    if how == "mean":
        return math.fsum(rewards) / len(rewards)
    return math.prod(rewards)


def steps_call(request: StepsRequest, _context: Context) -> Call:
    return Call(list(request.items), in_items, request.model)


def steps_response(request: StepsRequest, scored: ScoredItems, _call: Call) -> StepsResponse:
    results = []
    for item, kept in zip(request.items, scored.rewards, strict=True):
        cut = len(item.steps) - len(kept)  # type: ignore[arg-type]
        step_rewards = [None] * cut + list(kept)  # type: ignore[call-overload]
        results.append(
            StepResult(step_rewards=step_rewards, reward=aggregate_steps(kept, request.aggregate), steps_truncated=cut)
        )
    return StepsResponse(
        model=scored.model,
        results=results,
        usage=Usage(input_tokens=scored.input_tokens),
        batch_invariant=scored.batch_invariant,
    )
