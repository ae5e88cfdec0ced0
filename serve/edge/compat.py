"""The compatibility endpoints' own steps: each trainer's request shape into items, rewards into its answer.

They run in the same pipeline as ``/v1/score`` (``endpoints.py``, ``GatewayService.run``): the same validation,
limits, Scorer call and cross-request batching. ``POST /get_reward`` (OpenRLHF's remote reward model),
``POST /classify`` (vLLM's, which verl's reward loop calls) and ``POST /v1/embeddings`` (SGLang's, which verl calls
with an SGLang backend) turn their texts into ``{"text": ...}`` items, scored as already formatted: no chat template,
and a BOS the text already starts with is not doubled (the model's formatter collapses a duplicated leading BOS).
``POST /slime/reward`` (slime's ``remote_rm``) scores one ``{prompt, response}`` sample as ``/v1/score`` does (the
reward model's chat template applied); with ``?templated=true`` its prompt is already chat-templated text (slime's
``--apply-chat-template``) and prompt + response are scored as one formatted text. The Cohere/Jina rerank shape
(``/rerank``, ``/v1/rerank``, ``/v2/rerank``) scores each document as the response to the query. ``POST /pooling``
(vLLM's route for process reward models, STEP pooling) scores each text, whose step separators are already in it, at
every separator token, and answers vLLM's ``data[].data``: per separator, the head's class probabilities.

* ``/get_reward`` strips leading and trailing repeats of the tokenizer's pad token from each query, as
  OpenRLHF's own server does (its trainer decodes left-padded prompts with special tokens), when the
  tokenizer has a pad token that differs from EOS. An EOS at the end is kept: it is part of what the
  model scores. With ``compat.normalize`` the rewards are ``(r - mean) / std``.
* ``/classify`` returns ``probs = [sigmoid(r)]`` by default (vLLM applies the classifier's activation
  unless the request says ``"use_activation": false``, which is what RL trainers send) and ``[r]`` with
  activation off; ``r`` is normalised first with ``compat.normalize``. ``input`` may also be token ids.
  The rerank shape's ``relevance_score`` follows the same rule; ``/v1/embeddings`` and slime get ``r``.
  ``model`` follows API.md's model names (verl sends the path it loaded the reward model from); another
  name is a 404, as in vLLM. ``/get_reward`` scores with the first served model; ``/get_reward/<model>`` (a URL
  OpenRLHF's ``--reward.remote_url`` can hold) with the model or ensemble named there (404 when none). A ``model``
  in the body of ``/get_reward`` is ignored, as OpenRLHF's own server does.
  An ensemble answers with its combined reward (already normalised: ``compat.normalize`` changes nothing for it).
  Validation errors of the vLLM/SGLang shapes (``/classify``, ``/v1/embeddings``, the rerank shape) are 400, as
  there (the others: 422).
* Errors name the caller's own field: ``query[5]``, ``input[2]`` (``input`` for a single input), ``documents[3]``,
  ``prompt[0].role``.
* An empty ``query`` / ``input`` / ``documents`` list answers 200 with empty lists, without calling the Scorer.
* **Overload.** No trainer's client can take a 429: verl's reward loop gives up on any 4xx
  (``verl/experimental/reward_loop/reward_loop.py``, ``_post_request``), OpenRLHF's gives up after five
  tries one second apart whatever the status (``openrlhf/utils/agent.py``, ``_fetch_rewards_via_http``) and slime's
  after ten (``slime/rollout/rm_hub/__init__.py``, ``remote_rm``), while all send one request per sample all at
  once. So when the Scorer's queue is full, these routes wait for room (woken as this Gateway's requests finish)
  and try again, up to the request deadline: a deeper queue, not a 429 (``Endpoint.when_full``). Past the deadline
  the answer is 504, which all three retry.

Example::

    call = await get_reward_call(GetRewardRequest(query=["<s>Q: 2+2? A: 4</s>"]), context)   # one text item
"""

from __future__ import annotations

import time
import uuid

from rmserve.model.errors import RMServeError
from rmserve.model.items import PairItem, TextItem
from rmserve.serve.edge.compat_protocol import (
    ClassificationData,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyUsage,
    CohereRerankRequest,
    CohereRerankResponse,
    EmbeddingData,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbeddingsUsage,
    GetRewardRequest,
    GetRewardResponse,
    PoolingData,
    PoolingRequest,
    PoolingResponse,
    RerankDocument,
    RerankResultEntry,
    RerankUsage,
    SlimeRewardRequest,
    SlimeRewardResponse,
)
from rmserve.serve.edge.locations import in_list
from rmserve.serve.edge.native import best_first, sigmoid
from rmserve.serve.edge.pipeline import Call, Context
from rmserve.serve.edge.protocol import ScoredItems


def strip_padding(text: str, pad_token: str | None) -> str:
    """``text`` without leading and trailing repeats of ``pad_token`` (unchanged when there is none)."""
    if not pad_token:
        return text
    start, end = 0, len(text)
    while text.startswith(pad_token, start, end):
        start += len(pad_token)
    while end - len(pad_token) >= start and text.startswith(pad_token, end - len(pad_token), end):
        end -= len(pad_token)
    return text[start:end]


def with_status(status: int):
    """An error adapter: a malformed request answers ``status`` instead of 422 (vLLM's routes answer 400)."""

    def adapt(err: RMServeError) -> RMServeError:
        if err.status == 422:
            err.status = status
        return err

    return adapt


def _normalize(context: Context) -> bool:
    return context.service.config.compat.normalize


# -- OpenRLHF: POST /get_reward, /get_reward/<model> ----------------------------------------------------------
async def get_reward_call(request: GetRewardRequest, context: Context) -> Call:
    """``model`` comes from the URL (``/get_reward/<model>``): OpenRLHF sends no model field of its own."""
    model = context.path_model
    pad = await _strippable_pad_token(context, model) if request.query else None
    items = [TextItem(text=strip_padding(q, pad)) for q in request.query]
    return Call(items, in_list("query", single=False), model, _normalize(context))


def get_reward_response(_request: GetRewardRequest, scored: ScoredItems, _call: Call) -> GetRewardResponse:
    return GetRewardResponse(rewards=scored.shown, scores=list(scored.shown), extra_logs={})


async def _strippable_pad_token(context: Context, model: str | None) -> str | None:
    """The tokenizer's pad token, when it has one that is not also its EOS (every replica of a model serves the
    same tokenizer; an ensemble's is its first member's)."""
    tokens = await context.service.special_tokens(model)
    pad, eos = tokens.get("pad_token"), tokens.get("eos_token")
    return pad if pad and pad != eos else None


# -- vLLM: POST /classify; SGLang: POST /v1/embeddings ----------------------------------------------------------
def inputs_call(request: ClassifyRequest | EmbeddingsRequest, context: Context) -> Call:
    return Call(request.items(), in_list("input", single=request.single()), request.model, _normalize(context))


def classify_response(request: ClassifyRequest, scored: ScoredItems, _call: Call) -> ClassifyResponse:
    activate = request.apply_activation()
    data = [ClassificationData(index=i, probs=[sigmoid(r) if activate else r]) for i, r in enumerate(scored.shown)]
    tokens = scored.input_tokens
    return ClassifyResponse(
        id=f"classify-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=scored.model,
        data=data,
        usage=ClassifyUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


def embeddings_response(_request: EmbeddingsRequest, scored: ScoredItems, _call: Call) -> EmbeddingsResponse:
    tokens = scored.input_tokens
    return EmbeddingsResponse(
        model=scored.model,
        data=[EmbeddingData(index=i, embedding=[r]) for i, r in enumerate(scored.shown)],
        usage=EmbeddingsUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


# -- slime: POST /slime/reward -----------------------------------------------------------------------------------
def slime_call(request: SlimeRewardRequest, context: Context) -> Call:
    templated = context.params.get("templated", "false").lower() in {"1", "true", "yes"}
    if templated and isinstance(request.prompt, str):
        item: PairItem | TextItem = TextItem(text=request.prompt + request.response)
        locate = _slime_text_location
    else:
        item, locate = PairItem(prompt=request.prompt, response=request.response), _slime_location
    return Call([item], locate, None, _normalize(context))


def _slime_location(_index: int, field: str | None) -> str:
    return field or "response"


def _slime_text_location(_index: int, _field: str | None) -> str:
    return "response"


def slime_response(_request: SlimeRewardRequest, scored: ScoredItems, _call: Call) -> SlimeRewardResponse:
    return SlimeRewardResponse(reward=scored.shown[0], model=scored.model)


# -- Cohere / Jina rerank shape: POST /rerank, /v1/rerank, /v2/rerank ------------------------------------------------
def is_cohere_rerank(body: object) -> bool:
    """The rerank shape is told from rmserve's own ``/v1/rerank`` body by its fields."""
    return isinstance(body, dict) and "groups" not in body and ("query" in body or "documents" in body)


def cohere_rerank_call(request: CohereRerankRequest, context: Context) -> Call:
    items = [PairItem(prompt=request.query, response=text) for text in request.texts()]
    return Call(items, _in_documents, request.model, _normalize(context))


def _in_documents(index: int, field: str | None) -> str:
    return "query" if field and field.startswith("prompt") else f"documents[{index}]"


def cohere_rerank_response(request: CohereRerankRequest, scored: ScoredItems, _call: Call) -> CohereRerankResponse:
    activate = request.use_activation is not False
    scores = [sigmoid(r) if activate else r for r in scored.shown]
    texts = request.texts()
    results = [
        RerankResultEntry(
            index=i,
            relevance_score=scores[i],
            document=RerankDocument(text=texts[i]) if request.return_documents else None,
        )
        for i in best_first(scored.shown)[: request.top_n]
    ]
    return CohereRerankResponse(
        id=f"rerank-{uuid.uuid4().hex}",
        model=scored.model,
        results=results,
        usage=RerankUsage(total_tokens=scored.input_tokens),
    )


# -- vLLM's PRM route: POST /pooling -----------------------------------------------------------------------------
async def pooling_call(request: PoolingRequest, context: Context) -> Call:
    """The texts as items (their separators already in them); the model's card says how a step's probabilities are
    laid out."""
    card = await context.service.card(request.model)
    return Call(request.items(), in_list("input", single=request.single()), request.model, model_card=card)


def step_probabilities(reward: float, card: dict | None) -> list[float]:
    """A step's vector as vLLM's STEP pooling returns it: a two-class head's probabilities in the checkpoint's order
    (the reward is class ``step_label``'s), a one-output head's sigmoid alone."""
    card = card or {}
    if card.get("step_outputs", 2) == 1:
        return [reward]
    return [1.0 - reward, reward] if card.get("step_label", 1) == 1 else [reward, 1.0 - reward]


def pooling_response(_request: PoolingRequest, scored: ScoredItems, call: Call) -> PoolingResponse:
    card = dict(call.model_card or {})
    data = [
        PoolingData(index=i, data=[step_probabilities(r, card) for r in steps])  # type: ignore[union-attr]
        for i, steps in enumerate(scored.rewards)
    ]
    tokens = scored.input_tokens
    return PoolingResponse(
        id=f"pool-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=scored.model,
        data=data,
        usage=ClassifyUsage(prompt_tokens=tokens, total_tokens=tokens),
    )
