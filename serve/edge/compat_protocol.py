"""Request and response bodies of the compatibility routes (API.md), shaped as their origins send them.

Unlike the native routes, these accept and ignore fields they do not know, as OpenRLHF's reward
server and vLLM do (trainers send extra fields such as ``prompts``, ``labels``, ``add_special_tokens``).

Example::

    GetRewardRequest.model_validate({"query": ["<s>Q: 2+2? A: 4</s>"], "prompts": ["Q: 2+2?"], "labels": [""]})
    ClassifyRequest.model_validate({"model": "rm", "input": "<s>Q: 2+2? A: 4</s>", "use_activation": False})
    ClassifyRequest.model_validate({"input": [[1, 15043, 29892], [1, 3532]], "activation": False})   # token ids
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from rmserve.model.items import TextItem, TokensItem

# vLLM applies the classifier's activation (sigmoid for one label) unless told otherwise; so do we.
DEFAULT_ACTIVATION = True


class _CompatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- OpenRLHF remote reward model: POST /get_reward ------------------------------------------------
class GetRewardRequest(_CompatRequest):
    """``{"query": [str, ...], "prompts": ..., "labels": ...}``: each query is prompt + response as decoded text.

    An empty ``query`` is answered with empty lists: OpenRLHF splits a call's queries across its reward URLs,
    and a URL whose share is empty still gets a request.
    """

    query: list[StrictStr] = Field(description="Formatted texts to score (special tokens included); may be empty.")
    prompts: Any = Field(None, description="Sent by OpenRLHF; not used.")
    labels: Any = Field(None, description="Sent by OpenRLHF; not used.")


class GetRewardResponse(_Response):
    rewards: list[float]
    scores: list[float] = Field(description="The same values as rewards (OpenRLHF reads either).")
    extra_logs: dict[str, Any] = Field(default_factory=dict)


# -- vLLM-style classify: POST /classify -----------------------------------------------------------
TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


class ClassifyRequest(_CompatRequest):
    """``{"model"?, "input": str | [str] | [int] | [[int]], "use_activation"?: bool, "activation"?: bool}``.

    As vLLM: ``input`` is one text, a list of texts, one list of token ids or a list of such lists (ids from the
    reward model's own tokenizer). An empty list is answered with an empty ``data``.
    """

    model: StrictStr | None = Field(
        None,
        description="Optional; a served model's id, the path it was loaded from or a served_model_names entry, or "
        "an ensemble's name. Absent: the first served model.",
    )
    input: StrictStr | list[StrictStr] | TokenIds | list[TokenIds] = Field(
        description="One formatted text, a list of them, one list of token ids, or a list of such lists."
    )
    use_activation: StrictBool | None = Field(
        None, description="true: probs[0] = sigmoid(reward); false: the raw reward. Default: true, as vLLM."
    )
    activation: StrictBool | None = Field(None, description="Older name of use_activation (which wins if both).")

    def single(self) -> bool:
        """The caller sent one input (a text or one list of token ids), not a list of them."""
        return isinstance(self.input, str) or (bool(self.input) and isinstance(self.input[0], int))

    def items(self) -> list[TextItem | TokensItem]:
        if isinstance(self.input, str):
            return [TextItem(text=self.input)]
        if self.single():
            return [TokensItem(input_ids=self.input)]
        return [TextItem(text=x) if isinstance(x, str) else TokensItem(input_ids=x) for x in self.input]

    def apply_activation(self) -> bool:
        if self.use_activation is not None:
            return self.use_activation
        return self.activation if self.activation is not None else DEFAULT_ACTIVATION


class ClassificationData(_Response):
    index: int
    label: str | None = Field(None, description="Always null: a reward model has one output and no class names.")
    probs: list[float]
    num_classes: Literal[1] = 1


class ClassifyUsage(_Response):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: Literal[0] = 0


class ClassifyResponse(_Response):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: ClassifyUsage
