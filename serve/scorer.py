"""The ``Scorer`` deployment: one reward model per replica, cross-request dynamic batching.

For each request: tokenize its items once (on a tokenizer thread, off the event loop), then put each
item into Ray Serve's batch queue (``serve.batch`` with ``batch_size_fn`` = padded token cost, so a
batch closes on the token budget, the item cap or the wait timeout). Batches go through an
``EngineFeeder``: ``ScoringEngine.score_batch`` runs on a forward thread while the event loop keeps
accepting and tokenizing, and batches that formed meanwhile are merged into the next forward.
Every item gets its own outcome, so a bad item fails only the request it came in.

A trainer inside the same Ray cluster skips HTTP::

    handle = serve.get_deployment_handle("Scorer", app_name="rmserve")
    rewards = await handle.score.remote([{"prompt": "2+2?", "response": "4"}])   # or .remote(...).result()
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from rmserve.model import RewardModel, TokenizedItem, load_reward_model
from rmserve.model.errors import (
    InternalError,
    InvalidRequestError,
    ModelLoadError,
    OverloadedError,
    RequestTooLargeError,
    RMServeError,
    item_error,
)
from rmserve.model.items import Item, payload_size

from .batching import BatchLimits, BatchStats, EngineFeeder, batch_cost
from .config import ScorerUserConfig, ServerConfig
from .errors import internal_error
from .faults import FaultPlan
from .instrumentation import ScorerMetrics
from .metrics import Snapshot
from .metrics_hub import start_reporting
from .protocol import ScoredItems

log = logging.getLogger("rmserve.serve")
Outcome = float | RMServeError
# Batches formed while a forward runs wait in the EngineFeeder (at most this many), to be merged into the next forward.
MERGE_WINDOW = 32
# Requests with more characters (plus token ids) than this tokenize on their own thread (``_large_tokenizer_thread``).
LARGE_REQUEST_SIZE = 100_000


class _Ticket:
    """A request's items on their way to a forward pass: how many started one, and whether the caller went away."""

    __slots__ = ("gone", "started")

    def __init__(self) -> None:
        self.gone = False
        self.started = 0


@dataclasses.dataclass(eq=False)
class _Queued:
    """One item in the batch queue; its length (for the token budget) is its token count."""

    input_ids: tuple[int, ...]
    ticket: _Ticket

    def __len__(self) -> int:
        return len(self.input_ids)


# The outcome of an item dropped because its caller went away (nobody reads it: the caller's future is cancelled).
_CLIENT_GONE = InternalError("dropped: the client went away before the item's batch started")


class _MuteTokenBudgetWarning(logging.Filter):
    """Ray warns when max_batch_size > max_ongoing_requests; ours counts tokens, not requests."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("`max_batch_size`")


@serve.deployment(name="Scorer")
class Scorer:
    """Scores items with one reward model; batches items across concurrent requests.

    Methods callable through a ``DeploymentHandle``: ``score(items, normalize=False) -> list[float]``,
    ``score_request(items, normalize) -> ScoredItems``, ``info()``, ``special_tokens()``, ``stats()``,
    ``metrics_snapshot()``.
    """

    def __init__(self, config: ServerConfig):
        if config.testing.scorer_start_delay_s:
            time.sleep(config.testing.scorer_start_delay_s)
        logging.getLogger("ray.serve").addFilter(_MuteTokenBudgetWarning())
        self._config = config
        self._limits = BatchLimits(config.batching.max_batch_tokens, config.batching.max_batch_items)
        self._max_queued_items = config.limits.max_queued_items
        self._queued_items = 0
        self._rejected_requests = 0
        self._rescored_batches = 0  # batches that failed as a whole and were rescored item by item
        self._merged_calls = 0  # score_requests calls (each carries the requests a Gateway merged)
        self._merged_requests = 0
        self._client_gone_items = 0  # items dropped before their forward pass because their caller went away
        self._gone_lock = threading.Lock()  # orders "caller went away" against "item starts its forward pass"
        self._batch_stats = BatchStats()
        self._faults = FaultPlan()
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="rmserve-tokenize")
        # Requests with megabytes of text tokenize for seconds; they get their own thread so that the small
        # requests behind them are not stuck in the queue (the Rust tokenizer releases the GIL while it works).
        self._large_tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="rmserve-tokenize-large")
        self._forward_thread = ThreadPoolExecutor(1, thread_name_prefix="rmserve-forward")
        self.model: RewardModel = load_reward_model(config.model_spec())
        if config.compat.normalize and self.model.normalization is None:
            raise ModelLoadError(
                f"compat.normalize is on but model {self.model.model_id} has no normalisation; set "
                "model.reward_mean and model.reward_std, or add mean/std to its config.json"
            )
        self._warm_up()
        self._metrics = ScorerMetrics(self.model.info())
        self.model.engine.observers.append(self._metrics.on_forward)  # after the warm-up: it is not traffic
        self._feeder = EngineFeeder(self._forward, self._limits, self._forward_thread, self._on_batch)
        self._score_one = serve.batch(
            max_batch_size=self._limits.max_batch_tokens,
            batch_wait_timeout_s=config.batching.batch_wait_timeout_s,
            max_concurrent_batches=MERGE_WINDOW,
            batch_size_fn=self._batch_size,
        )(self._run_batch)
        self._metrics_reporter = start_reporting("scorer", self.metrics_snapshot)
        log.info("scorer ready: %s", self.model.info())

    # -- handle API -------------------------------------------------------------------------------
    async def score(self, items: Sequence[Item | dict], normalize: bool = False) -> list[float]:
        """Rewards for ``items`` (any of the four forms, dicts or models), in input order; raises typed errors."""
        result = await self.score_request(items, normalize)
        if isinstance(result, RMServeError):
            raise result
        return result.shown

    async def score_request(self, items: Sequence[Item | dict], normalize: bool = False) -> ScoredItems | RMServeError:
        """Rewards plus what the HTTP routes report (truncation, token usage).

        A request's error is returned, not raised, so expected 4xx answers do not fill the replica log
        with tracebacks; ``score`` raises it.
        """
        try:
            return await self._score_items(items, normalize)
        except RMServeError as err:
            return err
        except Exception as exc:  # a bug, not the caller's fault: sanitise
            return internal_error(exc, "scoring a request")

    async def score_requests(
        self, requests: Sequence[tuple[Sequence[Item | dict], bool]]
    ) -> list[ScoredItems | RMServeError]:
        """``score_request`` for each ``(items, normalize)`` of several HTTP requests merged by a Gateway (one Ray
        call instead of one per request); each gets its own result or error, in order."""
        self._merged_calls += 1
        self._merged_requests += len(requests)
        return list(await asyncio.gather(*(self.score_request(items, normalize) for items, normalize in requests)))

    def info(self) -> dict:
        """The model card of ``GET /v1/models``."""
        return self.model.info()

    def special_tokens(self) -> dict[str, str | None]:
        """The tokenizer's special tokens as text (the compatibility routes strip padding with them)."""
        tokenizer = self.model.tokenizer
        return {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token}

    def metrics_snapshot(self) -> Snapshot:
        """This replica's metrics; ``GET /metrics`` shows their sum over all replicas (see ``metrics_hub``)."""
        return self._metrics.snapshot(
            queue_depth=self._queued_items,
            rejected_requests=self._rejected_requests,
            oom_splits=self.model.engine.stats.oom_splits,
            client_gone_items=self._client_gone_items,
        )

    def stats(self) -> dict:
        """Counters of this replica: batches formed (sizes), engine totals, queue, rejections."""
        engine = self.model.engine.stats
        return {
            "pid": os.getpid(),
            "queued_items": self._queued_items,
            "rejected_requests": self._rejected_requests,
            "client_gone_items": self._client_gone_items,
            "rescored_batches": self._rescored_batches,
            "gateway_calls": {"calls": self._merged_calls, "requests": self._merged_requests},
            "limits": {**dataclasses.asdict(self._limits), "max_queued_items": self._max_queued_items},
            "batch_wait_timeout_s": self._score_one._get_batch_wait_timeout_s(),
            "batching": self._batch_stats.snapshot(),
            "engine": {
                **{k: v for k, v in dataclasses.asdict(engine).items() if k != "last_microbatch_sizes"},
                "padding_efficiency": engine.padding_efficiency,
                "max_batch_tokens": self.model.engine.max_batch_tokens,
            },
        }

    def reconfigure(self, user_config: dict) -> None:
        """Apply a new ``ScorerUserConfig`` (batching limits, queue limit) without restarting."""
        tuning = ScorerUserConfig.model_validate(user_config)
        batching = tuning.batching
        self._limits.max_batch_tokens = batching.max_batch_tokens
        self._limits.max_batch_items = batching.max_batch_items
        self._max_queued_items = tuning.max_queued_items
        self.model.engine.max_batch_tokens = batching.max_batch_tokens
        self._score_one.set_max_batch_size(batching.max_batch_tokens)
        self._score_one.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        log.info("scorer reconfigured: %s", tuning.model_dump())

    def set_faults(self, **plan) -> None:
        """Test hook (needs ``testing.fault_injection``): see ``rmserve.serve.faults.FaultPlan``."""
        if not self._config.testing.fault_injection:
            raise InvalidRequestError("fault injection is disabled (testing.fault_injection is false)")
        self._faults = FaultPlan(**plan)
        self.model.engine.fault_injector = self._faults.engine_hook()

    # -- internals --------------------------------------------------------------------------------
    async def _score_items(self, items: Sequence[Item | dict], normalize: bool) -> ScoredItems:
        if normalize:
            self.model.normalize([])  # raises InvalidRequestError when the model has no normalisation
        if not items:
            return ScoredItems(model=self.model.model_id, rewards=[], normalized=[] if normalize else None)
        self._admit(len(items))
        ticket = _Ticket()
        try:
            loop = asyncio.get_running_loop()
            large = payload_size(items) > LARGE_REQUEST_SIZE
            executor = self._large_tokenizer_thread if large else self._tokenizer_thread
            tokenized = await loop.run_in_executor(executor, self._tokenize, items)
            lengths = [len(t) for t in tokenized]
            delay = self._faults.request_delay(lengths)
            if delay:
                await asyncio.sleep(delay)
            outcomes = await asyncio.gather(*(self._score_one(_Queued(t.input_ids, ticket)) for t in tokenized))
        except asyncio.CancelledError:  # the caller went away (e.g. its HTTP client disconnected)
            self._drop(ticket, len(items))
            raise
        finally:
            self._queued_items -= len(items)
        rewards = [_reward_or_raise(outcome, i) for i, outcome in enumerate(outcomes)]
        truncated = [i for i, t in enumerate(tokenized) if t.truncated]
        self._metrics.on_request(len(items), sum(lengths), len(truncated))
        return ScoredItems(
            model=self.model.model_id,
            rewards=rewards,
            normalized=self._normalized(rewards) if normalize else None,
            truncated=truncated,
            input_tokens=sum(lengths),
        )

    def _warm_up(self) -> None:
        """One real forward before the replica reports ready (fails the replica if it cannot score)."""
        self.model.score([{"text": "warm-up"}])

    def _admit(self, count: int) -> None:
        if count > self._max_queued_items:
            raise RequestTooLargeError(
                f"{count} items exceed the scorer's queue of {self._max_queued_items}; send smaller requests"
            )
        if self._queued_items + count > self._max_queued_items:
            self._rejected_requests += 1
            retry = self._config.limits.retry_after_s
            raise OverloadedError(
                f"the scorer is full ({self._queued_items} of {self._max_queued_items} items queued); "
                f"retry after {retry} s",
                retry_after=retry,
            )
        self._queued_items += count

    def _on_batch(self, lengths: list[int], merged: int) -> None:
        self._batch_stats.record(lengths, merged)
        self._metrics.on_batch(lengths, merged)

    def _normalized(self, rewards: list[float]) -> list[float]:
        """Normalised rewards; one that is not finite (e.g. a tiny reward_std) fails its item, never reaches JSON."""
        values = self.model.normalize(rewards)
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise item_error(InternalError, i, f"normalisation produced a non-finite reward ({value})")
        return values

    def _drop(self, ticket: _Ticket, count: int) -> None:
        """The caller of a request went away: its items that have not started a forward pass never will."""
        with self._gone_lock:
            ticket.gone = True
            self._client_gone_items += count - ticket.started

    def _tokenize(self, items: Sequence[Item | dict]) -> list[TokenizedItem]:
        return [self.model.tokenize(item, i) for i, item in enumerate(items)]

    def _batch_size(self, items: list[_Queued]) -> int:
        return batch_cost([len(q) for q in items], self._limits)

    async def _run_batch(self, items: list[_Queued]) -> list[Outcome]:
        return await self._feeder.score(items)

    def _forward(self, queued: list[_Queued]) -> list[Outcome]:
        """Score a batch (forward thread), leaving out the items whose caller went away while they waited."""
        live: list[int] = []
        with self._gone_lock:
            for k, item in enumerate(queued):
                if not item.ticket.gone:
                    item.ticket.started += 1
                    live.append(k)
        outcomes: list[Outcome] = [_CLIENT_GONE] * len(queued)
        if live:
            scored = self._score_sequences([queued[k].input_ids for k in live])
            for k, outcome in zip(live, scored, strict=True):
                outcomes[k] = outcome
        return outcomes

    def _score_sequences(self, sequences: list[tuple[int, ...]]) -> list[Outcome]:
        """Score a batch; if it fails as a whole, rescore item by item so only the culprit fails."""
        engine = self.model.engine
        try:
            return engine.score_batch(sequences)
        except Exception as exc:
            if len(sequences) == 1:
                return [internal_error(exc, "scoring a batch of one item")]
            log.warning("a batch of %d items failed (%r); rescoring them one by one", len(sequences), exc)
            self._rescored_batches += 1
        outcomes: list[Outcome] = []
        for seq in sequences:
            try:
                outcomes.extend(engine.score_batch([seq]))
            except Exception as exc:
                outcomes.append(internal_error(exc, "scoring one item"))
        return outcomes


def _reward_or_raise(outcome: Outcome, index: int) -> float:
    if isinstance(outcome, RMServeError):
        if outcome.index == index:
            raise outcome
        raise item_error(type(outcome), index, outcome.detail, outcome.field)
    return outcome
