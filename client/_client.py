"""``RewardClient``: the blocking client. Its only own logic is the send/sleep loop and the thread fan-out."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, TypeVar

import httpx

from ._calls import Call, Chunk, is_sleeping_call, models_call, probe_call, sleep_call, wake_up_call
from ._constants import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, MAX_CONCURRENCY, MAX_ITEMS_PER_REQUEST
from ._core import PROBE_FAILURES, BaseRewardClient, Timeout
from .types import Item, ModelInfo, PreferenceResult, Prompt, RerankResult, ScoreResult, StepResult

T = TypeVar("T")


class RewardClient(BaseRewardClient):
    """Blocking client for an rmserve server; safe to share between threads.

    Long lists are split into requests of at most ``max_items_per_request`` items, sent
    ``max_concurrency`` at a time on threads, and put back in input order. Connection errors,
    408, 429 and 5xx are retried ``max_retries`` times with exponential backoff and jitter
    (``Retry-After`` honoured up to 60 s). ``timeout`` is per attempt, in seconds. Every request
    method also takes ``timeout=`` and ``max_retries=`` for one call (``None``: the client's), and
    the scoring methods ``model=``: the model or ensemble that call asks for (``None``: the client's
    ``model``; neither: the server's first model).
    ``base_url`` and ``api_key`` default to ``RMSERVE_BASE_URL`` and ``RMSERVE_API_KEY``, read here.

    Example::

        with RewardClient("http://127.0.0.1:8000") as client:
            rewards = client.score(["What is 2+2?"], ["4"])  # [1.73]
            both = client.score_detailed([{"prompt": "2+2?", "response": "4"}], model="both")  # an ensemble
            both.rewards, both.member_rewards, both.spread  # {"helpful": [0.9], "safe": [1.2]}, [0.15]

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
        http_client: httpx.Client | None = None,
        sleep: Callable[[float], None] | None = None,
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
        self._http = http_client if http_client is not None else httpx.Client()
        self._sleep = sleep or time.sleep

    # --- public methods

    def score(
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
        return self._execute(self._pairs_call(prompts, responses, normalize, model), timeout, max_retries).rewards

    def score_items(
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
        return self.score_detailed(
            items, normalize=normalize, model=model, timeout=timeout, max_retries=max_retries
        ).rewards

    def score_detailed(
        self,
        items: Iterable[Item],
        *,
        normalize: bool = False,
        model: str | None = None,
        timeout: Timeout = None,
        max_retries: int | None = None,
    ) -> ScoreResult:
        """Like ``score_items`` but the whole answer: rewards, truncated indices, token usage, model."""
        return self._execute(self._score_call(items, normalize, model), timeout, max_retries)

    def preference(
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
        return self._execute(call, timeout, max_retries)

    def rerank(
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
        return self._execute(call, timeout, max_retries)

    def steps(
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
        return self._execute(call, timeout, max_retries)

    def label_scores(
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
        return self._execute(call, timeout, max_retries)

    def models(self, *, timeout: Timeout = None, max_retries: int | None = None) -> list[ModelInfo]:
        """The served model(s), as ``GET /v1/models`` describes them."""
        return self._execute(models_call(), timeout, max_retries)

    def sleep(self, level: int = 1, *, timeout: Timeout = None, max_retries: int | None = None) -> bool:
        """Put every served model (every replica) to sleep between reward phases: ``level`` 1 moves the weights to
        host memory and drops the caches, 2 drops the weights (reloaded from the checkpoint on wake). Returns once
        all of them sleep (``True``); scoring calls meanwhile get 503 ``sleeping`` (``SleepingError``). Idempotent."""
        return self._execute(sleep_call(level), timeout, max_retries)

    def wake_up(self, *, timeout: Timeout = None, max_retries: int | None = None) -> bool:
        """Bring the weights back; returns once every model scores again (``False``: not sleeping). Idempotent. A
        level-2 wake reloads the checkpoint: give a large one a longer ``timeout``."""
        return self._execute(wake_up_call(), timeout, max_retries)

    def is_sleeping(self, *, timeout: Timeout = None, max_retries: int | None = None) -> bool:
        """``True`` when every replica of every served model sleeps (``GET /is_sleeping``)."""
        return self._execute(is_sleeping_call(), timeout, max_retries)

    def health(self, *, timeout: Timeout = None) -> bool:
        """``True`` if the server process answers ``/health``; ``False`` on any error. Never retried."""
        return self._probe("/health", timeout)

    def ready(self, *, timeout: Timeout = None) -> bool:
        """``True`` once the model is loaded and warmed up (``/ready`` is 200); else ``False``. Never retried."""
        return self._probe("/ready", timeout)

    def close(self) -> None:
        """Close the connection pool (unless it came in as ``http_client``)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the I/O loop

    def _probe(self, path: str, timeout: Timeout) -> bool:
        try:
            return self._execute(probe_call(path), timeout, 0)
        except PROBE_FAILURES:
            return False

    def _execute(self, call: Call[T], timeout: Timeout, max_retries: int | None) -> T:
        timeout, retries = self._resolve(timeout, max_retries)
        if len(call.chunks) <= 1 or self.max_concurrency == 1:
            bodies = [self._send(call, chunk, timeout, retries) for chunk in call.chunks]
            return call.merge(call.chunks, bodies)
        # httpx.Client is thread-safe, so the threads share its connection pool.
        pool = ThreadPoolExecutor(min(self.max_concurrency, len(call.chunks)), thread_name_prefix="rmserve-client")
        futures = [pool.submit(self._send, call, chunk, timeout, retries) for chunk in call.chunks]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            # Raise as soon as any chunk failed (the earliest failed one in input order), not after the slowest.
            for future in futures:
                if future in done and future.exception() is not None:
                    future.result()
            bodies = [future.result() for future in futures]
        finally:
            # On failure, chunks not yet started are dropped and running ones are not waited for.
            pool.shutdown(wait=False, cancel_futures=True)
        return call.merge(call.chunks, bodies)

    def _send(self, call: Call[Any], chunk: Chunk, timeout: Timeout, max_retries: int) -> Any:
        request = self._build_request(call, chunk, timeout)
        attempt = 0
        while True:
            try:
                response = self._http.send(request)
            except httpx.TransportError as exc:
                outcome = self._outcome(call, chunk, attempt, max_retries, exc=exc)
            else:
                outcome = self._outcome(call, chunk, attempt, max_retries, response=response)
            if outcome.retry_in is None:
                return outcome.unwrap()
            self._sleep(outcome.retry_in)
            attempt += 1
