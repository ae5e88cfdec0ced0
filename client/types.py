"""Typed results of the client. Field names follow the response bodies of API.md.

Example::

    result = client.score_detailed([{"prompt": "Hi", "response": "Hello!"}])
    result.rewards, result.truncated, result.usage.input_tokens
    best = client.rerank(["Hi"], [["Hello!", "Go away."]])[0]
    best.best_index, [(r.index, r.reward) for r in best.ranking]

When the request names an ensemble (``model="both"``), the results also carry each member's normalised reward and
the members' spread (the fields are ``None`` for a single model)::

    result = client.score_detailed(items, model="both")
    result.member_rewards["safe"][i], result.spread[i]          # item i, in input order
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict

__all__ = [
    "Item",
    "Message",
    "ModelInfo",
    "PreferenceResult",
    "Prompt",
    "RankedResponse",
    "RerankResult",
    "StepResult",
    "ScoreResult",
    "Usage",
]

Message = Mapping[str, str]
"""One chat turn: ``{"role": "user" | "assistant" | "system", "content": str}``."""
Prompt = str | Sequence[Message]
"""A prompt: plain text or a list of chat turns (the server applies the model's chat template)."""
Item = Mapping[str, Any]
"""One item in any of API.md's four forms: ``{prompt, response}``, ``{messages}``, ``{text}``, ``{input_ids}``."""


class _Result(BaseModel):
    # Frozen: results are values. Extra fields allowed so a newer server does not break an older client.
    model_config = ConfigDict(frozen=True, extra="allow", protected_namespaces=())


class Usage(_Result):
    """Token accounting of a call, summed over its chunks."""

    input_tokens: int = 0


class ScoreResult(_Result):
    """The full answer of ``/v1/score``: ``rewards[i]`` belongs to ``items[i]``.

    ``truncated`` lists the indices (into the whole call, not one chunk) that were left-truncated.
    ``model`` is ``None`` only for an empty call, which sends no request.
    """

    model: str | None = None
    rewards: list[float]
    truncated: list[int] = []
    usage: Usage = Usage()
    member_rewards: dict[str, list[float]] | None = None
    """Ensembles only: each member's normalised reward ``z_m`` per item, in input order (member name -> list)."""
    spread: list[float] | None = None
    """Ensembles only: the weighted standard deviation of the members' normalised rewards, per item."""
    batch_invariant: bool = False
    """The model scored in batch-invariant mode: each reward is bitwise independent of what shared its batch."""
    attributes: list[dict[str, float]] | None = None
    """Multi-attribute models only: per item, every attribute by name (the reward is their weighted sum)."""


class PreferenceResult(_Result):
    """One pair of ``/v1/preference``: ``prob_a = sigmoid(reward_a - reward_b)``; ties prefer ``"a"``.

    Example: ``PreferenceResult(reward_a=1.0, reward_b=0.0, prob_a=0.731, preferred="a")``.
    """

    reward_a: float
    reward_b: float
    prob_a: float
    preferred: Literal["a", "b"]
    member_rewards_a: dict[str, float] | None = None
    """Ensembles only: each member's normalised reward of ``response_a`` (member name -> reward)."""
    member_rewards_b: dict[str, float] | None = None
    """Ensembles only: each member's normalised reward of ``response_b``."""
    spread_a: float | None = None
    """Ensembles only: the members' spread for ``response_a``."""
    spread_b: float | None = None
    """Ensembles only: the members' spread for ``response_b``."""


class RankedResponse(NamedTuple):
    """One entry of a ranking; a tuple, so ``for index, reward in result.ranking`` works."""

    index: int
    reward: float


class RerankResult(_Result):
    """One group of ``/v1/rerank``: ``ranking`` is sorted by reward, best first (cut to ``top_k``).

    ``index`` refers to the group's own ``responses`` list; ``best_index == ranking[0].index``.
    """

    ranking: list[RankedResponse]
    best_index: int
    member_rewards: dict[str, list[float]] | None = None
    """Ensembles only: each member's normalised reward per response, in the group's input order (not ranked)."""
    spread: list[float] | None = None
    """Ensembles only: the members' spread per response, in the group's input order."""


class StepResult(_Result):
    """One item of ``/v1/steps``: a reward per step (``None`` where left truncation cut the step's separator) and
    their aggregate (``min``, ``prod``, ``last`` or ``mean`` of the non-null ones).

    Example: ``StepResult(step_rewards=[0.91, 0.42], reward=0.42, steps_truncated=0)``.
    """

    step_rewards: list[float | None]
    reward: float | None
    steps_truncated: int = 0


class ModelInfo(_Result):
    """One entry of ``GET /v1/models``, e.g. ``ModelInfo(id="rmserve-demo", dtype="float32", max_length=512)``.

    ``normalization`` holds the statistics ``normalize=True`` uses (e.g. ``{"mean": ..., "std": ...}``), if any.
    """

    id: str
    names: list[str] = []
    dtype: str | None = None
    quantization: str | None = None
    max_length: int | None = None
    head: str | None = None
    normalization: dict[str, float] | None = None
    template: str | None = None
