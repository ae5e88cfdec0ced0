"""Request and response bodies of the compatibility routes (API.md), shaped as their origins send them.

Unlike the native routes, these accept and ignore fields they do not know, as OpenRLHF's reward server, vLLM,
SGLang and slime do (trainers send extra fields such as ``prompts``, ``labels``, ``add_special_tokens``).

Example::

    GetRewardRequest.model_validate({"query": ["<s>Q: 2+2? A: 4</s>"], "prompts": ["Q: 2+2?"], "labels": [""]})
    ClassifyRequest.model_validate({"model": "rm", "input": "<s>Q: 2+2? A: 4</s>", "use_activation": False})
    ClassifyRequest.model_validate({"input": [[1, 15043, 29892], [1, 3532]], "activation": False})   # token ids
    EmbeddingsRequest.model_validate({"model": "/ckpt/rm", "input": "<s>Q: 2+2? A: 4</s>"})   # verl + SGLang
    SlimeRewardRequest.model_validate({"prompt": "2+2?", "response": "4", "label": "4"})
    CohereRerankRequest.model_validate({"query": "2+2?", "documents": ["4", {"text": "5"}], "top_n": 1})
    LabelScoresRequest.model_validate({"query": "Is 2+2=4? Answer:", "items": [" Yes"], "label_token_ids": [9, 7]})
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from rmserve.model.items import Prompt, TextItem, TokensItem

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


_MODEL_HELP = (
    "Optional; a served model's id, the path it was loaded from or a served_model_names entry, or an ensemble's "
    "name. Absent: the first served model."
)


class _Inputs(_CompatRequest):
    """``{"model"?, "input": str | [str] | [int] | [[int]]}``, as vLLM and SGLang take it: one text, a list of texts,
    one list of token ids or a list of such lists (ids from the reward model's own tokenizer), each scored as
    already formatted. An empty list is answered with an empty ``data``."""

    model: StrictStr | None = Field(None, description=_MODEL_HELP)
    input: StrictStr | list[StrictStr] | TokenIds | list[TokenIds] = Field(
        description="One formatted text, a list of them, one list of token ids, or a list of such lists."
    )

    def single(self) -> bool:
        """The caller sent one input (a text or one list of token ids), not a list of them."""
        return isinstance(self.input, str) or (bool(self.input) and isinstance(self.input[0], int))

    def items(self) -> list[TextItem | TokensItem]:
        if isinstance(self.input, str):
            return [TextItem(text=self.input)]
        if self.single():
            return [TokensItem(input_ids=self.input)]
        return [TextItem(text=x) if isinstance(x, str) else TokensItem(input_ids=x) for x in self.input]


class ClassifyRequest(_Inputs):
    """``/classify``: ``_Inputs`` plus ``use_activation`` / ``activation``."""

    use_activation: StrictBool | None = Field(
        None, description="true: probs[0] = sigmoid(reward); false: the raw reward. Default: true, as vLLM."
    )
    activation: StrictBool | None = Field(None, description="Older name of use_activation (which wins if both).")

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


# -- vLLM's PRM route (STEP pooling): POST /pooling -----------------------------------------------------
class PoolingRequest(_Inputs):
    """``{"model"?, "input": ...}`` with the step separators already in each text (vLLM's ``/pooling``)."""


class PoolingData(_Response):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[list[float]] = Field(
        description="Per step separator, the head's probabilities (two-class heads: [bad, good] as the checkpoint "
        "orders them; one-output heads: [sigmoid])."
    )


class PoolingResponse(_Response):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[PoolingData]
    usage: ClassifyUsage


# -- SGLang-style embeddings (verl's reward loop with an SGLang backend): POST /v1/embeddings -----------------
class EmbeddingsRequest(_Inputs):
    """``{"model"?, "input": ...}``: the reward is the last element of each ``embedding``."""


class EmbeddingData(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] = Field(description="[reward]: a reward model's one output (its last element is read).")


class EmbeddingsUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(_Response):
    object: Literal["list"] = "list"
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingsUsage


# -- slime's remote reward model (--rm-type remote_rm): one sample per request ---------------------------------
class SlimeRewardRequest(_CompatRequest):
    """``{"prompt": str | messages, "response": str, "label"?: any}``: one sample, as slime's ``remote_rm`` posts it."""

    prompt: Prompt
    response: StrictStr
    label: Any = Field(None, description="Sent by slime (the sample's label); not used by a reward model.")


class SlimeRewardResponse(_Response):
    reward: float = Field(description="The raw reward (slime: --reward-key reward).")
    model: str


# -- Cohere / Jina rerank shape (what vLLM serves): POST /rerank, /v1/rerank, /v2/rerank --------------------------
class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: StrictStr


class CohereRerankRequest(_CompatRequest):
    """``{"model"?, "query": str, "documents": [str | {"text": str}], "top_n"?: int}``: each document is scored as
    the response to ``query`` (the reward model's chat template applied, as ``/v1/rerank`` does)."""

    model: StrictStr | None = Field(None, description=_MODEL_HELP)
    query: StrictStr
    documents: list[StrictStr | RerankDocument]
    top_n: StrictInt | None = Field(None, ge=1, description="Keep the best top_n results.")
    return_documents: StrictBool = Field(True, description="Echo each document's text in its result.")
    use_activation: StrictBool | None = Field(
        None, description="true: relevance_score = sigmoid(reward); false: the raw reward. Default: true, as vLLM."
    )

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class RerankResultEntry(_Response):
    index: int
    relevance_score: float
    document: RerankDocument | None = None

    @model_serializer(mode="wrap")
    def _drop_absent_document(self, handler: SerializerFunctionWrapHandler):  # no return type: keeps the schema
        data = handler(self)
        if data.get("document") is None:
            data.pop("document", None)
        return data


class RerankUsage(_Response):
    total_tokens: int


class CohereRerankResponse(_Response):
    id: str
    model: str
    results: list[RerankResultEntry] = Field(description="Best first (equal scores keep input order).")
    usage: RerankUsage


# -- SGLang's POST /v1/score (vLLM's generative scores): label-token probabilities of a judge -----------------------
class LabelScoresRequest(_CompatRequest):
    """``{"model"?, "query", "items", "label_token_ids", "apply_softmax"?, "item_first"?}``: per item, the next-token
    probability of each label id at the end of ``query + item`` (``item + query`` with ``item_first``), joined as
    text or as token ids (both the same kind), without decoding."""

    model: StrictStr | None = Field(None, description=_MODEL_HELP)
    query: StrictStr | list[StrictInt] = Field(description="Text, or token ids of the judge's tokenizer.")
    items: StrictStr | list[StrictStr] | list[list[StrictInt]] = Field(
        description="One text, a list of texts, or a list of token-id lists: the same kind as query."
    )
    label_token_ids: list[Annotated[StrictInt, Field(ge=0)]] = Field(
        min_length=1, description="Token ids whose probabilities each item gets, in this order."
    )
    apply_softmax: StrictBool = Field(
        False,
        description="true: softmax over just the labels' logits; false: probabilities under the whole vocabulary.",
    )
    item_first: StrictBool = Field(False, description="true: each item goes before the query.")

    @field_validator("items")
    @classmethod
    def _same_kind_as_query(cls, items: str | list, info: ValidationInfo) -> str | list:
        if isinstance(items, list) and not items:
            raise ValueError("items is empty")
        query = info.data.get("query")
        text_items = isinstance(items, str) or isinstance(items[0], str)
        if query is not None and isinstance(query, str) != text_items:
            raise ValueError("query and items must both be text or both be token ids")
        return items

    def joined(self) -> list[str | list[int]]:
        """Each item joined with the query, in the order ``item_first`` says."""
        items = [self.items] if isinstance(self.items, str) else self.items
        return [item + self.query if self.item_first else self.query + item for item in items]  # type: ignore[operator]


class LabelScoresResponse(_Response):
    scores: list[list[float]] = Field(description="Per item, one probability per label token id, in their order.")
    model: str
    usage: ClassifyUsage
    object: Literal["scoring"] = "scoring"
