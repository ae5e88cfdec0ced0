"""The compatibility routes as thin adapters over the native score pipeline.

``POST /get_reward`` (OpenRLHF's remote reward model) and ``POST /classify`` (vLLM's, which verl's reward
loop calls) turn their texts into ``{"text": ...}`` items and go through ``GatewayService.score``: the
same validation, limits, Scorer call and cross-request batching as ``/v1/score``. Texts are scored as
already formatted: no chat template, and a BOS the text already starts with is not doubled (the model's
formatter collapses a duplicated leading BOS).

* ``/get_reward`` strips leading and trailing repeats of the tokenizer's pad token from each query, as
  OpenRLHF's own server does (its trainer decodes left-padded prompts with special tokens), when the
  tokenizer has a pad token that differs from EOS. An EOS at the end is kept: it is part of what the
  model scores. With ``compat.normalize`` the rewards are ``(r - mean) / std``.
* ``/classify`` returns ``probs = [sigmoid(r)]`` by default (vLLM applies the classifier's activation
  unless the request says ``"use_activation": false``, which is what RL trainers send) and ``[r]`` with
  activation off; ``r`` is normalised first with ``compat.normalize``. ``input`` may also be token ids.
  ``model`` follows API.md's model names (verl sends the path it loaded the reward model from); another
  name is a 404, as in vLLM. ``/get_reward`` scores with the first served model; ``/get_reward/<model>`` (a URL
  OpenRLHF's ``--reward.remote_url`` can hold) with the model or ensemble named there (404 when none). A ``model``
  in the body of ``/get_reward`` is ignored, as OpenRLHF's own server does.
  An ensemble answers with its combined reward (already normalised: ``compat.normalize`` changes nothing for it).
  Validation errors are 400, as in vLLM (native routes: 422).
* Errors name the caller's own field: ``query[5]``, ``input[2]`` (``input`` for a single input).
* An empty ``query`` / ``input`` list answers 200 with empty lists, without calling the Scorer.
* **Overload.** Neither trainer's client can take a 429: verl's reward loop gives up on any 4xx
  (``verl/experimental/reward_loop/reward_loop.py``, ``_post_request``) and OpenRLHF's gives up after five
  tries one second apart whatever the status (``openrlhf/utils/agent.py``, ``_fetch_rewards_via_http``), while
  both send one request per sample all at once. So when the Scorer's queue is full, these routes wait for room
  (woken as this Gateway's requests finish) and try again, up to the request deadline: a deeper queue, not a
  429. Past the deadline the answer is 504, which verl retries (5xx) and OpenRLHF retries too.

Example::

    compat = CompatService(GatewayService(links, config), config)
    await compat.get_reward(GetRewardRequest(query=["<s>Q: 2+2? A: 4</s>"]))   # rewards == scores
"""

from __future__ import annotations

import time
import uuid

from rmserve.model.errors import OverloadedError, RMServeError
from rmserve.model.items import Item, TextItem
from rmserve.serve.config.settings import ServerConfig
from rmserve.serve.edge.compat_protocol import (
    ClassificationData,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyUsage,
    GetRewardRequest,
    GetRewardResponse,
)
from rmserve.serve.edge.locations import Locate, in_list
from rmserve.serve.edge.protocol import ScoredItems
from rmserve.serve.edge.service import GatewayService, sigmoid


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


def classify_error(err: RMServeError) -> RMServeError:
    """vLLM's statuses: a malformed request is a 400 (native routes answer 422)."""
    if err.status == 422:
        err.status = 400
    return err


class CompatService:
    """``/get_reward`` and ``/classify`` on top of a ``GatewayService``."""

    def __init__(self, service: GatewayService, config: ServerConfig):
        self.service = service
        self.normalize = config.compat.normalize
        self._retry_after_s = float(config.limits.retry_after_s)

    async def get_reward(self, request: GetRewardRequest, model: str | None = None) -> GetRewardResponse:
        """``model`` comes from the URL (``/get_reward/<model>``): OpenRLHF sends no model field of its own."""
        if not request.query:
            if model is not None:
                await self.service.check_model(model)
            return GetRewardResponse(rewards=[], scores=[], extra_logs={})
        pad = await self._strippable_pad_token(model)
        items = [TextItem(text=strip_padding(q, pad)) for q in request.query]
        scored = await self._score(items, model, in_list("query", single=False))
        return GetRewardResponse(rewards=scored.shown, scores=list(scored.shown), extra_logs={})

    async def classify(self, request: ClassifyRequest) -> ClassifyResponse:
        model_id = await self.service.check_model(request.model)
        items = request.items()
        if items:
            scored = await self._score(items, request.model, in_list("input", single=request.single()))
        else:
            scored = ScoredItems(model=model_id, rewards=[])
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

    # -- steps --------------------------------------------------------------------------------------
    async def _score(self, items: list[Item], model: str | None, locate: Locate) -> ScoredItems:
        """The native pipeline (one Scorer call); a full queue is waited out, not answered with 429 (see above)."""
        while True:
            try:
                return await self.service.score_items(items, self.normalize, model, locate)
            except OverloadedError:
                await self.service.capacity.wait(self._retry_after_s)

    async def _strippable_pad_token(self, model: str | None) -> str | None:
        """The tokenizer's pad token, when it has one that is not also its EOS (every replica of a model serves
        the same tokenizer; an ensemble's is its first member's)."""
        tokens = await self.service.special_tokens(model)
        pad, eos = tokens.get("pad_token"), tokens.get("eos_token")
        return pad if pad and pad != eos else None
