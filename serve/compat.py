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
  activation off; ``r`` is normalised first with ``compat.normalize``. A ``model`` other than the served
  one is a 404, as in vLLM; validation errors are 400, as in vLLM.

Example::

    compat = CompatService(GatewayService(scorer_handle, config), config)
    await compat.get_reward(GetRewardRequest(query=["<s>Q: 2+2? A: 4</s>"]))   # rewards == scores
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid

from rmserve.model.errors import InvalidRequestError, NotReadyError, RMServeError
from rmserve.model.items import TextItem

from .compat_protocol import (
    ClassificationData,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyUsage,
    GetRewardRequest,
    GetRewardResponse,
)
from .config import ServerConfig
from .protocol import ScoreRequest, ScoreResponse
from .service import READY_PROBE_TIMEOUT_S, GatewayService, sigmoid

_ITEM_PARAM = re.compile(r"^items\[(\d+)\]")
_ITEM_MESSAGE = re.compile(r"^item (\d+): ")


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


def _rename_items(err: RMServeError, field: str, single: bool = False) -> RMServeError:
    """Name the request's own field in an item error: ``items[2].text`` → ``query[2]`` (or ``input``)."""
    if err.param is not None:
        err.param = _ITEM_PARAM.sub(lambda m: field if single else f"{field}[{m.group(1)}]", err.param, count=1)
        err.param = err.param.removesuffix(".text")
    err.message = _ITEM_MESSAGE.sub(lambda m: f"{field}: " if single else f"{field}[{m.group(1)}]: ", err.message)
    err.args = (err.message,)
    return err


def get_reward_error(err: RMServeError) -> RMServeError:
    """OpenRLHF has no error format of its own: the native body, with the item named as ``query[i]``."""
    return _rename_items(err, "query")


def classify_error(err: RMServeError, single_input: bool = False) -> RMServeError:
    """vLLM's statuses: a malformed request is a 400 (not 422); the item is named as ``input[i]``."""
    if err.status == 422:
        err.status = 400
    return _rename_items(err, "input", single_input)


class CompatService:
    """``/get_reward`` and ``/classify`` on top of a ``GatewayService``."""

    def __init__(self, service: GatewayService, config: ServerConfig):
        self.service = service
        self.normalize = config.compat.normalize
        self._probe_timeout = min(READY_PROBE_TIMEOUT_S, config.limits.request_timeout_s / 2)
        self._model_id: str | None = None
        self._pad_token: str | None = None
        self._tokens_known = False

    async def get_reward(self, request: GetRewardRequest) -> GetRewardResponse:
        pad = await self._strippable_pad_token()
        try:
            scored = await self._score([strip_padding(q, pad) for q in request.query])
        except RMServeError as err:
            raise get_reward_error(err) from None
        return GetRewardResponse(rewards=scored.rewards, scores=list(scored.rewards), extra_logs={})

    async def classify(self, request: ClassifyRequest) -> ClassifyResponse:
        if request.model is not None and request.model != await self._served_model():
            err = InvalidRequestError(f"The model `{request.model}` does not exist.", param="model")
            err.status = 404
            raise err
        try:
            scored = await self._score(request.texts())
        except RMServeError as err:
            raise classify_error(err, single_input=isinstance(request.input, str)) from None
        activate = request.apply_activation()
        data = [
            ClassificationData(index=i, probs=[sigmoid(r) if activate else r]) for i, r in enumerate(scored.rewards)
        ]
        tokens = scored.usage.input_tokens
        return ClassifyResponse(
            id=f"classify-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=scored.model,
            data=data,
            usage=ClassifyUsage(prompt_tokens=tokens, total_tokens=tokens),
        )

    # -- steps --------------------------------------------------------------------------------------
    async def _score(self, texts: list[str]) -> ScoreResponse:
        """The native /v1/score pipeline on text items (one Scorer call for all of them)."""
        request = ScoreRequest(items=[TextItem(text=t) for t in texts], normalize=self.normalize)
        return await self.service.score(request)

    async def _served_model(self) -> str:
        if self._model_id is None:
            self._model_id = (await self.service.models()).data[0].id
        return self._model_id

    async def _strippable_pad_token(self) -> str | None:
        """The tokenizer's pad token, when it has one that is not also its EOS (every replica serves one model)."""
        if not self._tokens_known:
            response = self.service.scorer.special_tokens.remote()
            try:
                tokens = await asyncio.wait_for(_resolve(response), self._probe_timeout)
            except TimeoutError:
                response.cancel()
                raise NotReadyError("the model is not loaded yet; GET /ready turns 200 when it is") from None
            pad, eos = tokens.get("pad_token"), tokens.get("eos_token")
            self._pad_token = pad if pad and pad != eos else None
            self._tokens_known = True
        return self._pad_token


async def _resolve(response):
    return await response
