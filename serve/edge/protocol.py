"""Request and response bodies of the native HTTP routes (API.md), as pydantic models.

Native request bodies reject unknown fields; an item is one of the four forms of ``rmserve.model.items``
(told apart by its keys), and one request uses one form for all its items.

Example::

    ScoreRequest.model_validate({"items": [{"prompt": "2+2?", "response": "4"}]})
    ScoreResponse(model="rmserve-demo", rewards=[0.7], truncated=[], usage=Usage(input_tokens=9))
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
    field_validator,
    model_serializer,
)

from rmserve.model.items import (
    ConversationItem,
    Item,
    PairItem,
    Prompt,
    StepsItem,
    TextItem,
    TokensItem,
    item_form,
)

ITEM_FORMS_HELP = "an item is exactly one of {prompt, response}, {messages}, {text}, {input_ids}"


def _item_tag(value: Any) -> str | None:
    """Which item form a raw item is, from its keys (None: no form matches)."""
    if isinstance(value, PairItem | ConversationItem | TextItem | TokensItem):
        return item_form(value)
    if not isinstance(value, dict):
        return None
    for key, tag in (("input_ids", "tokens"), ("messages", "conversation"), ("text", "text")):
        if key in value:
            return tag
    return "pair" if "prompt" in value or "response" in value else None


ItemField = Annotated[
    Annotated[PairItem, Tag("pair")]
    | Annotated[ConversationItem, Tag("conversation")]
    | Annotated[TextItem, Tag("text")]
    | Annotated[TokensItem, Tag("tokens")],
    Discriminator(_item_tag, custom_error_type="invalid_item", custom_error_message=ITEM_FORMS_HELP),
]


class _NativeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    normalize: StrictBool = Field(False, description="Return (r - mean) / std instead of the raw reward.")
    model: StrictStr | None = Field(
        None,
        description="Optional; a served model's id, path or one of its served_model_names, or an ensemble's name "
        "(else 404). Absent: the first served model.",
    )


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


MemberRewards = dict[str, list[float]]


class _OmitsUnset(_Response):
    """A response whose optional fields (``OMITTED_WHEN_UNSET``: an ensemble's, a model card's ``path``) are left out
    of the JSON when not set, so a single model's body is exactly what it was before ensembles existed."""

    OMITTED_WHEN_UNSET: typing.ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop_unset_fields(self, handler: SerializerFunctionWrapHandler):  # no return type: keeps the schema
        data = handler(self)
        for name in self.OMITTED_WHEN_UNSET:
            if data.get(name) is None:
                data.pop(name, None)
        return data


# -- /v1/score ----------------------------------------------------------------------------------
class ScoreRequest(_NativeRequest):
    """``{"items": [item, ...], "normalize": false}``."""

    items: list[ItemField] = Field(min_length=1, description="Items to score, all of one form.")

    @field_validator("items")
    @classmethod
    def _one_form(cls, items: list) -> list:
        forms: dict[str, int] = {}
        for i, item in enumerate(items):
            forms.setdefault(item_form(item), i)
        if len(forms) > 1:  # a field validator, so the error's param is "items"
            described = ", ".join(f"items[{i}] is {form}" for form, i in forms.items())
            raise ValueError(f"items mix forms ({described}); one request uses one item form")
        return items


class Usage(_Response):
    input_tokens: int


class ScoreResponse(_OmitsUnset):
    OMITTED_WHEN_UNSET = ("member_rewards", "spread", "attributes")

    model: str
    rewards: list[float]
    truncated: list[int] = Field(description="Indices of the items that were left-truncated.")
    usage: Usage
    batch_invariant: bool = Field(
        False, description="The model scores in batch-invariant mode: each reward is bitwise independent of its batch."
    )
    member_rewards: MemberRewards | None = Field(
        None, description="Ensembles only: each member's normalised reward per item (member name -> list)."
    )
    spread: list[float] | None = Field(
        None, description="Ensembles only: the weighted standard deviation of the members' normalised rewards."
    )
    attributes: list[dict[str, float]] | None = Field(
        None,
        description="Multi-attribute models only: per item, every attribute by its id2label name (raw); the reward is "
        "their weighted sum (the model's attribute_weights).",
    )


# -- /v1/preference -----------------------------------------------------------------------------
class PreferencePair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    response_a: StrictStr
    response_b: StrictStr


class PreferenceRequest(_NativeRequest):
    pairs: list[PreferencePair] = Field(min_length=1)


class PreferenceResult(_OmitsUnset):
    OMITTED_WHEN_UNSET = ("member_rewards_a", "member_rewards_b", "spread_a", "spread_b")

    reward_a: float
    reward_b: float
    prob_a: float = Field(
        description="sigmoid(raw reward_a - raw reward_b); a pairwise judge's: P(first verdict token) of the pair"
    )
    preferred: Literal["a", "b"]
    member_rewards_a: dict[str, float] | None = Field(None, description="Ensembles only: members' rewards of a.")
    member_rewards_b: dict[str, float] | None = Field(None, description="Ensembles only: members' rewards of b.")
    spread_a: float | None = Field(None, description="Ensembles only: the members' spread for a.")
    spread_b: float | None = Field(None, description="Ensembles only: the members' spread for b.")


class PreferenceResponse(_Response):
    model: str
    results: list[PreferenceResult]
    batch_invariant: bool = Field(
        False, description="The model scores in batch-invariant mode: each reward is bitwise independent of its batch."
    )


# -- /v1/rerank ---------------------------------------------------------------------------------
class RerankGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    responses: list[StrictStr] = Field(min_length=1)


class RerankRequest(_NativeRequest):
    groups: list[RerankGroup] = Field(min_length=1)
    top_k: StrictInt | None = Field(None, ge=1, description="Keep the best top_k of each group's ranking.")


class RankedResponse(_Response):
    index: int
    reward: float


class RerankResult(_OmitsUnset):
    OMITTED_WHEN_UNSET = ("member_rewards", "spread")

    ranking: list[RankedResponse]
    best_index: int
    member_rewards: MemberRewards | None = Field(
        None, description="Ensembles only: each member's normalised reward per response, in the group's input order."
    )
    spread: list[float] | None = Field(
        None, description="Ensembles only: the members' spread per response, in the group's input order."
    )


class RerankResponse(_Response):
    model: str
    results: list[RerankResult]
    batch_invariant: bool = Field(
        False, description="The model scores in batch-invariant mode: each reward is bitwise independent of its batch."
    )


# -- /v1/steps -----------------------------------------------------------------------------------
Aggregate = Literal["min", "prod", "last", "mean"]


class StepsRequest(BaseModel):
    """``{"items": [{"prompt", "steps": [str, ...]}, ...], "aggregate": "min"}`` for a process reward model."""

    model_config = ConfigDict(extra="forbid")

    items: list[StepsItem] = Field(min_length=1, description="A prompt and a solution's steps per item.")
    aggregate: Aggregate = Field(
        "min", description="How an item's step rewards make its reward: min, prod, last or mean (of the non-null)."
    )
    model: StrictStr | None = Field(
        None, description="Optional; a served process reward model's id, path or served_model_names entry."
    )


class StepResult(_Response):
    step_rewards: list[float | None] = Field(
        description="One per step, in order; null where left truncation cut the step's separator."
    )
    reward: float | None = Field(description="The aggregate of the non-null step rewards.")
    steps_truncated: int = Field(description="How many leading steps lost their separator to left truncation.")


class StepsResponse(_Response):
    model: str
    results: list[StepResult]
    usage: Usage
    batch_invariant: bool = Field(
        False, description="The model scores in batch-invariant mode: each reward is bitwise independent of its batch."
    )


# -- operational --------------------------------------------------------------------------------
class ModelCard(_OmitsUnset):
    OMITTED_WHEN_UNSET = (
        "ensemble",
        "path",
        "step_separator",
        "step_outputs",
        "step_label",
        "attributes",
        "judge",
        "verdict_tokens",
    )

    id: str
    names: list[str] = Field(
        default_factory=list,
        description="Every name a request's model may use: the id, served_model_names, the path as given and resolved.",
    )
    dtype: str
    quantization: str
    batch_invariant: bool = False
    max_length: int
    head: str
    normalization: dict[str, float] | None
    template: str
    path: str | None = Field(None, description="The checkpoint directory the model was loaded from.")
    kind: Literal["outcome", "process"] = Field(
        "outcome", description="'process': a process reward model, scored per step on POST /v1/steps only."
    )
    step_separator: str | None = Field(None, description="A process reward model's step separator token.")
    step_outputs: int | None = Field(None, description="A process reward model's outputs per step (1 or 2).")
    step_label: int | None = Field(None, description="Which of them is the step reward's probability.")
    attributes: dict[str, float] | None = Field(
        None, description="A multi-attribute model's attributes and their weights in the reward."
    )
    judge: Literal["pointwise", "pairwise"] | None = Field(
        None,
        description="A verdict-token judge: it also answers SGLang's label-probability body on POST /v1/score; "
        "'pairwise' (verdict_pair_template set): /v1/preference judges each pair in one input.",
    )
    verdict_tokens: list[str] | None = Field(None, description="A judge's verdict tokens, the first the reward's.")
    ensemble: dict[str, Any] | None = Field(
        None,
        description="Ensembles only: {members: {name: weight}, combine, lambda} (see rmserve.serve.routing.ensemble).",
    )


class ModelsResponse(_Response):
    data: list[ModelCard]


class HealthResponse(_Response):
    status: Literal["ok"] = "ok"


class ReadyResponse(_Response):
    status: Literal["ready"] = "ready"
    model: str


# -- Gateway ↔ Scorer (Ray handle) --------------------------------------------------------------
@dataclass
class ScoredItems:
    """What ``Scorer.score_request`` returns for one request's items, in input order."""

    model: str
    rewards: list[float]  # raw (process reward models: a list of step rewards per item, one per separator kept)
    normalized: list[float] | None = None  # when asked for
    truncated: list[int] = field(default_factory=list)
    input_tokens: int = 0
    lengths: list[int] = field(default_factory=list)  # tokens of each item as scored (after truncation)
    member_rewards: dict[str, list[float]] | None = None  # ensembles: each member's normalised rewards
    spread: list[float] | None = None  # ensembles: the members' weighted spread per item
    batch_invariant: bool = False  # the model (every member of an ensemble) scores in batch-invariant mode

    @property
    def shown(self) -> list[float]:
        """The rewards the response reports: normalised when asked for, else raw."""
        return self.normalized if self.normalized is not None else self.rewards


__all__ = [
    "Item",
    "ModelCard",
    "ModelsResponse",
    "PreferencePair",
    "PreferenceRequest",
    "PreferenceResponse",
    "PreferenceResult",
    "RankedResponse",
    "RerankGroup",
    "RerankRequest",
    "RerankResponse",
    "RerankResult",
    "ScoreRequest",
    "ScoreResponse",
    "ScoredItems",
    "StepResult",
    "StepsRequest",
    "StepsResponse",
    "HealthResponse",
    "ReadyResponse",
    "Usage",
]
