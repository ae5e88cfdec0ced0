"""``AsyncRewardClient``: the asyncio client. Its only own logic is the send/sleep loop and the task fan-out."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import httpx

from ._calls import Call, Chunk, is_sleeping_call, models_call, probe_call, sleep_call, wake_up_call
from ._constants import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, MAX_CONCURRENCY, MAX_ITEMS_PER_REQUEST
from ._core import PROBE_FAILURES, BaseRewardClient, Timeout
from .types import Item, ModelInfo, PreferenceResult, Prompt, RerankResult, ScoreResult, StepResult

T = TypeVar("T")


class AsyncRewardClient(BaseRewardClient):
    """asyncio client for an rmserve server, with the methods and behaviour of ``RewardClient``.

    Chunks of a long list run as tasks, at most ``max_concurrency`` in flight per call; retries
    sleep with ``asyncio.sleep`` so the event loop (e.g. a GRPO rollout loop) never blocks.

    Example::

        async with AsyncRewardClient("http://127.0.0.1:8000") as client:
            rewards = await client.score(["What is 2+2?"], ["4"])

    ``http_client``, ``sleep`` and ``rng`` exist for tests and custom transports; a passed
    ``http_client`` is not closed by ``close()``.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_items_per_request: int = MAX_ITEMS_PER_REQUEST,
        max_concurrency: int = MAX_CONCURRENCY,
        model: str | None = None,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        rng: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            max_items_per_request=max_items_per_request,
            max_concurrency=max_concurrency,
            model=model,
            headers=headers,
            rng=rng,
        )
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.AsyncClient()
        self._sleep = sleep or asyncio.sleep

    # --- public methods (see RewardClient for the details of each)

    async def score(
        self,
        prompts: Iterable[Prompt],
        responses: Iterable[str],
        *,
        normalize: bool = False,
        model: str | None = None,
        timeout: Timeout = None,
        max_retries: int | None = None,
    ) -> list[float]:
        """One reward per ``(prompt, response)`` pair, in input order. A prompt is text or chat turns."""
        return (
            await self._execute(self._pairs_call(prompts, responses, normalize, model), timeout, max_retries)
        ).rewards

    async def score_items(
        self,
        items: Iterable[Item],
        *,
        normalize: bool = False,
        model: str | None = None,
        timeout: Timeout = None,
        max_retries: int | None = None,
    ) -> list[float]:
        """One reward per item; items are ``{prompt, response}``, ``{messages}``, ``{text}`` or ``{input_ids}``, and
        may mix forms (each run of one form goes in its own requests)."""
        return (
            await self.score_detailed(items, normalize=normalize, model=model, timeout=timeout, max_retries=max_retries)
        ).rewards

    async def score_detailed(
        self,
        items: Iterable[Item],
        *,
        normalize: bool = False,
        model: str | None = None,
        timeout: Timeout = None,
        max_retries: int | None = None,
    ) -> ScoreResult:
        """Like ``score_items`` but the whole answer: rewards, truncated indices, token usage, model."""
        return await self._execute(self._score_call(items, normalize, model), timeout, max_retries)

    async def preference(
        self,
        prompts: Iterable[Prompt],
        responses_a: Iterable[str],
        responses_b: Iterable[str],
        *,
        normalize: bool = False,
        model: str | None = None,
        timeout: Timeout = None,
        max_retries: int | None = None,
    ) -> list[PreferenceResult]:
        """Compare two responses per prompt: rewards, ``prob_a`` and the ``preferred`` one (``"a"``/``"b"``)."""
        call = self._preference_call(prompts, responses_a, responses_b, normalize, model)
        return await self._execute(call, timeout, max_retries)

    async def rerank(
        self,
        prompts: Iterable[Prompt],
        groups_of_responses: Iterable[Iterable[str]],
        *,
        top_k: int | None = None,
        normalize: bool = False,
        model: str | None = None,
        timeout: Timeout = None,
        max_retries: int | None = None,
    ) -> list[RerankResult]:
        """Best-of-n: per prompt, its responses ranked by reward (best first, cut to ``top_k``)."""
        call = self._rerank_call(prompts, groups_of_responses, top_k, normalize, model)
        return await self._execute(call, timeout, max_retries)

    async def steps(
        self,
        prompts: Iterable[Prompt],
        solutions: Iterable[Iterable[str]],
        *,
        aggregate: str = "min",
        model: str | None = None,
        timeout: Timeout = None,
        max_retries: int | None = None,
    ) -> list[StepResult]:
        """A process reward model's step rewards: per prompt, its solution's steps each get a reward (the server
        places the step separators), and ``reward`` aggregates them (``min``, ``prod``, ``last`` or ``mean``)."""
        call = self._steps_call(prompts, solutions, aggregate, model)
        return await self._execute(call, timeout, max_retries)

    async def label_scores(
        self,
        query: str | Sequence[int],
        items: Iterable[str] | Iterable[Sequence[int]],
        label_token_ids: Iterable[int],
        *,
        apply_softmax: bool = False,
        item_first: bool = False,
        model: str | None = None,
        timeout: Timeout = None,
        max_retries: int | None = None,
    ) -> list[list[float]]:
        """A judge's verdict probabilities (a model served with ``verdict_tokens``): per item, the next-token
        probability of each of ``label_token_ids`` at the end of ``query + item`` (``item + query`` with
        ``item_first``), under the whole vocabulary or, with ``apply_softmax``, over just those labels. ``query`` and
        ``items`` are text, or token ids of the judge's tokenizer (SGLang's ``/v1/score`` body)."""
        call = self._label_scores_call(query, items, label_token_ids, apply_softmax, item_first, model)
        return await self._execute(call, timeout, max_retries)

    async def models(self, *, timeout: Timeout = None, max_retries: int | None = None) -> list[ModelInfo]:
        """The served model(s), as ``GET /v1/models`` describes them."""
        return await self._execute(models_call(), timeout, max_retries)

    async def sleep(self, level: int = 1, *, timeout: Timeout = None, max_retries: int | None = None) -> bool:
        """Put every served model (every replica) to sleep between reward phases: ``level`` 1 moves the weights to
        host memory and drops the caches, 2 drops the weights (reloaded from the checkpoint on wake). Returns once
        all of them sleep (``True``); scoring calls meanwhile get 503 ``sleeping`` (``SleepingError``). Idempotent."""
        return await self._execute(sleep_call(level), timeout, max_retries)

    async def wake_up(self, *, timeout: Timeout = None, max_retries: int | None = None) -> bool:
        """Bring the weights back; returns once every model scores again (``False``: not sleeping). Idempotent. A
        level-2 wake reloads the checkpoint: give a large one a longer ``timeout``."""
        return await self._execute(wake_up_call(), timeout, max_retries)

    async def is_sleeping(self, *, timeout: Timeout = None, max_retries: int | None = None) -> bool:
        """``True`` when every replica of every served model sleeps (``GET /is_sleeping``)."""
        return await self._execute(is_sleeping_call(), timeout, max_retries)

    async def health(self, *, timeout: Timeout = None) -> bool:
        """``True`` if the server process answers ``/health``; ``False`` on any error. Never retried."""
        return await self._probe("/health", timeout)

    async def ready(self, *, timeout: Timeout = None) -> bool:
        """``True`` once the model is loaded and warmed up (``/ready`` is 200); else ``False``. Never retried."""
        return await self._probe("/ready", timeout)

    async def close(self) -> None:
        """Close the connection pool (unless it came in as ``http_client``)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- the I/O loop

    async def _probe(self, path: str, timeout: Timeout) -> bool:
        try:
            return await self._execute(probe_call(path), timeout, 0)
        except PROBE_FAILURES:
            return False

    async def _execute(self, call: Call[T], timeout: Timeout, max_retries: int | None) -> T:
        timeout, retries = self._resolve(timeout, max_retries)
        if len(call.chunks) <= 1:
            bodies = [await self._send(call, chunk, timeout, retries) for chunk in call.chunks]
            return call.merge(call.chunks, bodies)
        semaphore = asyncio.Semaphore(self.max_concurrency)

        async def send(chunk: Chunk) -> Any:
            async with semaphore:
                return await self._send(call, chunk, timeout, retries)

        tasks = [asyncio.ensure_future(send(chunk)) for chunk in call.chunks]
        try:
            bodies = await asyncio.gather(*tasks)
        except BaseException:
            # The first failure (or our own cancellation) ends the call: stop the other chunks too.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return call.merge(call.chunks, list(bodies))

    async def _send(self, call: Call[Any], chunk: Chunk, timeout: Timeout, max_retries: int) -> Any:
        request = self._build_request(call, chunk, timeout)
        attempt = 0
        while True:
            try:
                response = await self._http.send(request)
            except httpx.TransportError as exc:
                outcome = self._outcome(call, chunk, attempt, max_retries, exc=exc)
            else:
                outcome = self._outcome(call, chunk, attempt, max_retries, response=response)
            if outcome.retry_in is None:
                return outcome.unwrap()
            await self._sleep(outcome.retry_in)
            attempt += 1
