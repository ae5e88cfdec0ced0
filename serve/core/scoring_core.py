"""``ScoringCore``: what a Scorer replica does, in plain Python (no Ray): admission, one batching queue, one forward
thread, dropping the items of callers that went away, rescoring a failed batch item by item, and the stats.

A request's path: admit its items (429 past ``max_queued_items``) → tokenize them once (on a tokenizer thread; big
requests on their own) → put them in the ``BatchQueue`` → the forward thread takes whatever waits, up to the token
budget planned and priced by ``ScoringEngine.plan``, runs that very plan (``ScoringEngine.run``) and hands each item
its outcome back on the caller's event loop. One forward runs at a time; items that arrive meanwhile wait for the
next one.

Sleep and wake (``sleep(level)``, ``wake_up()``): from the moment a sleep starts, new requests are refused with 503
``sleeping`` (``Retry-After``); the requests already admitted are scored to the end, then the weights move or go
(``model.residency``). Until a wake up has brought them back, every request gets that 503; none is lost or half
scored. Transitions run one at a time and finish even when their caller stops waiting; both are idempotent.

A caller that goes away (its task cancelled, or ``withdraw(request_id)`` from a Gateway that merged it with other
requests into one call) has its waiting items taken out of the queue: they never reach a forward, and nobody else's
items move. If a whole batch fails (not one item's error, an exception), its items are rescored one by one, so only
the culprit fails.

Example::

    core = ScoringCore(load_reward_model("demo"), BatchingConfig(), LimitsConfig())
    await core.score_request([{"prompt": "2+2?", "response": "4"}])                  # ScoredItems | RMServeError
    await core.score_requests([(items_a, False, "gw1:1"), (items_b, True, "gw1:2")])  # one Gateway call, two requests
    core.withdraw(["gw1:2"])                                                       # its caller left
    await core.sleep(2); await core.wake_up()                                      # between reward phases
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rmserve.model import EngineStats, RewardModel, TokenizedItem
from rmserve.model.errors import (
    InternalError,
    OverloadedError,
    RequestTooLargeError,
    RMServeError,
    SleepingError,
    item_error,
)
from rmserve.model.items import Item, payload_size
from rmserve.model.residency import WeightResidency, check_level
from rmserve.serve.config.settings import BatchingConfig, LimitsConfig
from rmserve.serve.core.batching import Batch, BatchQueue, QueuedItem, Ticket
from rmserve.serve.core.faults import FaultPlan
from rmserve.serve.edge.errors import internal_error
from rmserve.serve.edge.protocol import ScoredItems
from rmserve.serve.metrics.instrumentation import ScorerMetrics
from rmserve.serve.metrics.store import Snapshot

log = logging.getLogger("rmserve.serve")
Outcome = float | RMServeError
# Requests with more characters (plus token ids) than this tokenize on their own thread.
LARGE_REQUEST_SIZE = 100_000
# Withdrawals that arrived before their request (both are calls from a Gateway); the oldest are forgotten.
EARLY_WITHDRAWALS = 4096
# What a scoring request meets besides "awake": how the 503 ``sleeping`` names the state.
FALLING_ASLEEP, ASLEEP, WAKING = "falling asleep", "asleep", "waking up"
AWAKE = "awake"


class ScoringCore:
    """One reward model's scoring service: call ``score_request`` from an event loop; ``close`` ends it."""

    def __init__(self, model: RewardModel, batching: BatchingConfig, limits: LimitsConfig):
        self.model = model
        # The engine's totals count from here, with the metrics: what ran before (a warm-up) is not traffic.
        model.engine.stats = EngineStats()
        self.metrics = ScorerMetrics(model.info())
        model.engine.observers.append(self.metrics.on_forward)
        self.faults = FaultPlan()
        self.retry_after_s = limits.retry_after_s
        self.max_queued_items = limits.max_queued_items
        self.queued_items = 0  # admitted and not answered yet (event-loop thread only)
        self.residency = WeightResidency(model)
        self.sleep_state = AWAKE  # requests are admitted only while awake
        self.sleep_level = 0  # 0 awake, else the level the weights sleep at (set once they are out of the way)
        self._transition = asyncio.Lock()  # one sleep or wake at a time
        self._drained = asyncio.Event()  # set when queued_items falls to 0
        engine = model.engine
        self.queue = BatchQueue(engine.plan, lambda: engine.max_batch_tokens)
        self.configure(batching, limits.max_queued_items)
        self._by_id: dict[str, Ticket] = {}
        self._withdrawn_early: OrderedDict[str, None] = OrderedDict()
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="rmserve-tokenize")
        # Megabytes of text tokenize for seconds: on their own thread, the small requests behind them go on.
        self._large_tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="rmserve-tokenize-large")
        self._forward_thread = threading.Thread(target=self._forward_loop, name="rmserve-forward", daemon=True)
        self._forward_thread.start()

    def configure(self, batching: BatchingConfig, max_queued_items: int) -> None:
        """Apply batching limits: at start (the same budget the model was loaded with) and on ``reconfigure``."""
        self.model.engine.max_batch_tokens = batching.max_batch_tokens
        self.queue.max_batch_items = batching.max_batch_items
        self.queue.wait_timeout_s = batching.batch_wait_timeout_s
        self.max_queued_items = max_queued_items

    def set_faults(self, plan: FaultPlan) -> None:
        """Test hook: request delays here, forward failures, stalls and OOMs in the engine."""
        self.faults = plan
        self.model.engine.fault_injector = plan.engine_hook()

    def close(self) -> None:
        self.queue.close()
        self._tokenizer_thread.shutdown(wait=False)
        self._large_tokenizer_thread.shutdown(wait=False)

    # -- requests ----------------------------------------------------------------------------------------------
    async def score_request(
        self, items: Sequence[Item | dict], normalize: bool = False, request_id: str | None = None
    ) -> ScoredItems | RMServeError:
        """Rewards plus what the HTTP routes report, or the request's error (returned, not raised)."""
        try:
            return await self._score(items, normalize, request_id)
        except RMServeError as err:
            return err
        except Exception as exc:  # a bug, not the caller's fault: sanitise
            return internal_error(exc, "scoring a request")

    async def score_requests(self, requests: Sequence[tuple]) -> list[ScoredItems | RMServeError]:
        """``score_request`` for each ``(items, normalize[, request_id])`` of a Gateway's call; each its own result."""
        self.metrics.on_gateway_call(len(requests))
        return list(await asyncio.gather(*(self.score_request(*request) for request in requests)))

    async def score_requests_as_completed(self, requests: Sequence[tuple]) -> AsyncIterator[tuple[int, Any]]:
        """``score_requests``, yielding ``(index, result)`` as each request finishes: a request merged with a slower
        one (a long request, one waiting out a fault) gets its answer when it is ready, not when the call ends."""
        self.metrics.on_gateway_call(len(requests))

        async def indexed(k: int, request: tuple) -> tuple[int, Any]:
            return k, await self.score_request(*request)

        tasks = [asyncio.ensure_future(indexed(k, request)) for k, request in enumerate(requests)]
        try:
            for done in asyncio.as_completed(tasks):
                yield await done
        finally:  # the Gateway stopped listening (its replica went away): nothing is left running
            for task in tasks:
                task.cancel()

    def withdraw(self, request_ids: Sequence[str]) -> None:
        """The callers of these requests went away: their items that have not reached a forward never will."""
        for request_id in request_ids:
            ticket = self._by_id.get(request_id)
            if ticket is not None:
                self._leave(ticket)
                continue
            self._withdrawn_early[request_id] = None  # its call has not arrived yet
            if len(self._withdrawn_early) > EARLY_WITHDRAWALS:
                self._withdrawn_early.popitem(last=False)

    async def _score(self, items: Sequence[Item | dict], normalize: bool, request_id: str | None) -> ScoredItems:
        if normalize:
            self.model.normalize([])  # raises InvalidRequestError when the model has no normalisation
        if not items:
            return ScoredItems(model=self.model.model_id, rewards=[], normalized=[] if normalize else None)
        if self.sleep_state != AWAKE:
            raise self._sleeping()
        self._admit(len(items))
        loop = asyncio.get_running_loop()
        ticket = Ticket(len(items), context=(loop, loop.create_future()))
        if request_id is not None:
            self._by_id[request_id] = ticket
            if request_id in self._withdrawn_early:  # its caller left before the call arrived
                del self._withdrawn_early[request_id]
                self._leave(ticket)
        try:
            if ticket.gone:
                raise _withdrawn()
            large = payload_size(items) > LARGE_REQUEST_SIZE
            executor = self._large_tokenizer_thread if large else self._tokenizer_thread
            tokenized = await _unless_withdrawn(ticket, loop.run_in_executor(executor, self._tokenize, items))
            lengths = [len(t) for t in tokenized]
            delay = self.faults.request_delay(lengths)
            if delay:
                await _unless_withdrawn(ticket, asyncio.sleep(delay))
            queued = self.queue.put(ticket, [t.input_ids for t in tokenized])
            outcomes = await ticket.context[1] if queued else None
        except asyncio.CancelledError:  # the caller went away (e.g. its HTTP client disconnected)
            self._leave(ticket)
            raise
        finally:
            self.queued_items -= len(items)
            if self.queued_items == 0:
                self._drained.set()
            if request_id is not None:
                self._by_id.pop(request_id, None)
        if outcomes is None:
            raise _withdrawn()
        rewards = [_reward_or_raise(outcome, i) for i, outcome in enumerate(outcomes)]
        truncated = [i for i, t in enumerate(tokenized) if t.truncated]
        self.metrics.on_request(len(items), sum(lengths), len(truncated))
        return ScoredItems(
            model=self.model.model_id,
            rewards=rewards,
            normalized=self._normalized(rewards) if normalize else None,
            truncated=truncated,
            input_tokens=sum(lengths),
            lengths=lengths,
        )

    def _admit(self, count: int) -> None:
        if count > self.max_queued_items:
            raise RequestTooLargeError(
                f"{count} items exceed the scorer's queue of {self.max_queued_items}; send smaller requests"
            )
        if self.queued_items + count > self.max_queued_items:
            self.metrics.on_rejected()
            retry = self.retry_after_s
            raise OverloadedError(
                f"the scorer is full ({self.queued_items} of {self.max_queued_items} items queued); "
                f"retry after {retry} s",
                retry_after=retry,
            )
        self.queued_items += count

    def _leave(self, ticket: Ticket) -> None:
        """Take a request's waiting items out of the queue, count them, and let its caller return."""
        self.metrics.on_client_gone(self.queue.withdraw(ticket))
        future = ticket.context[1]
        if not future.done():
            future.set_result(None)

    def _tokenize(self, items: Sequence[Item | dict]) -> list[TokenizedItem]:
        return [self.model.tokenize(item, i) for i, item in enumerate(items)]

    def _normalized(self, rewards: list[float]) -> list[float]:
        """Normalised rewards; one that is not finite (e.g. a tiny reward_std) fails its item, never reaches JSON."""
        values = self.model.normalize(rewards)
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise item_error(InternalError, i, f"normalisation produced a non-finite reward ({value})")
        return values

    # -- the forward thread ------------------------------------------------------------------------------------
    def _forward_loop(self) -> None:
        engine = self.model.engine
        while (batch := self.queue.take()) is not None:
            padded_before = engine.stats.padded_tokens
            try:
                outcomes = self._run(batch)
            except BaseException as exc:  # the thread must live on: fail this batch's items only
                outcomes = [internal_error(exc, "scoring a batch")] * len(batch.items)
            self.metrics.on_batch([len(q.input_ids) for q in batch.items], engine.stats.padded_tokens - padded_before)
            by_loop: dict[Any, list[tuple[QueuedItem, Outcome]]] = {}
            for item, outcome in zip(batch.items, outcomes, strict=True):
                by_loop.setdefault(item.ticket.context[0], []).append((item, outcome))
            for loop, delivered in by_loop.items():
                with contextlib.suppress(RuntimeError):  # that event loop is closed: nobody waits for these
                    loop.call_soon_threadsafe(_deliver, delivered)

    def _run(self, batch: Batch) -> list[Outcome]:
        """Run the plan the queue priced the batch with; if it fails as a whole, rescore item by item so only the
        culprit fails."""
        engine = self.model.engine
        try:
            return engine.run(batch.plan)
        except Exception as exc:
            if len(batch.items) == 1:
                return [internal_error(exc, "scoring a batch of one item")]
            log.warning("a batch of %d items failed (%r); rescoring them one by one", len(batch.items), exc)
            self.metrics.on_rescored_batch()
        outcomes: list[Outcome] = []
        for item in batch.items:
            try:
                outcomes.extend(engine.score_batch([item.input_ids]))
            except Exception as exc:
                outcomes.append(internal_error(exc, "scoring one item"))
        return outcomes

    # -- sleep and wake -----------------------------------------------------------------------------------------
    async def sleep(self, level: int = 1) -> int:
        """Stop admitting requests, let the admitted ones finish, then release the model's memory at ``level`` (see
        ``model.residency``); returns the level it sleeps at. Asleep already: nothing changes (to sleep at another
        level, wake up first)."""
        check_level(level)
        return await self._run_transition(self._fall_asleep(level))

    async def wake_up(self) -> None:
        """Bring the weights back and admit requests again; awake already: nothing changes."""
        await self._run_transition(self._wake())

    def is_sleeping(self) -> bool:
        """True from the moment the weights are out of the way until they are back."""
        return self.sleep_level > 0

    async def _run_transition(self, step: Any) -> Any:
        """Run ``step`` after any transition under way; it finishes even when this caller stops waiting (a half-done
        transition would leave the weights in between)."""

        async def serialized() -> Any:
            async with self._transition:
                return await step

        return await asyncio.shield(asyncio.ensure_future(serialized()))

    async def _fall_asleep(self, level: int) -> int:
        if self.sleep_level:
            return self.sleep_level
        started = time.perf_counter()
        self.sleep_state = FALLING_ASLEEP
        try:
            while self.queued_items > 0:  # the admitted requests finish first: none is lost or half scored
                self._drained.clear()
                await self._drained.wait()
            await asyncio.to_thread(self.residency.sleep, level)
        except BaseException:
            self.sleep_state = AWAKE
            raise
        self.sleep_level, self.sleep_state = level, ASLEEP
        self.metrics.on_sleep_transition("sleep", level, time.perf_counter() - started)
        log.info("model %s asleep (level %d)", self.model.model_id, level)
        return level

    async def _wake(self) -> None:
        if not self.sleep_level:
            return
        started, level = time.perf_counter(), self.sleep_level
        self.sleep_state = WAKING
        try:
            await asyncio.to_thread(self.residency.wake)
        except BaseException:
            self.sleep_state = ASLEEP
            raise
        self.sleep_level, self.sleep_state = 0, AWAKE
        self.metrics.on_sleep_transition("wake", level, time.perf_counter() - started)
        log.info("model %s awake (was asleep at level %d)", self.model.model_id, level)

    def _sleeping(self) -> SleepingError:
        state = self.sleep_state + (f" (level {self.sleep_level})" if self.sleep_state == ASLEEP else "")
        return SleepingError(
            f"model {self.model.model_id} is {state}: it scores again after POST /wake_up; retry after "
            f"{self.retry_after_s} s",
            retry_after=self.retry_after_s,
        )

    # -- the model ----------------------------------------------------------------------------------------------
    def info(self) -> dict:
        """The model card of ``GET /v1/models``."""
        return self.model.info()

    def special_tokens(self) -> dict[str, str | None]:
        """The tokenizer's special tokens as text (the compatibility routes strip padding with them)."""
        tokenizer = self.model.tokenizer
        return {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token}

    # -- numbers -----------------------------------------------------------------------------------------------
    def metrics_snapshot(self) -> Snapshot:
        """This replica's metrics (``GET /metrics`` sums them over replicas)."""
        return self.metrics.snapshot(queue_depth=self.queued_items, engine_counters=self.model.engine.counters())

    def stats(self) -> dict:
        """Counters of this replica: queue, rejections, dropped items, batches formed, engine totals, limits; read
        from the same stores as ``metrics_snapshot``."""
        engine = self.model.engine
        return {
            "queued_items": self.queued_items,
            **self.metrics.counts(self.metrics_snapshot()),
            "limits": {
                "max_batch_tokens": engine.max_batch_tokens,
                "max_batch_items": self.queue.max_batch_items,
                "max_queued_items": self.max_queued_items,
            },
            "batch_wait_timeout_s": self.queue.wait_timeout_s,
            "engine": {
                **{k: v for k, v in dataclasses.asdict(engine.stats).items() if k != "last_microbatch_sizes"},
                "padding_efficiency": engine.stats.padding_efficiency,
                "overhead_tokens": engine.overhead_tokens,
                "caches": engine.cache_counters(),
            },
        }


async def _unless_withdrawn(ticket: Ticket, awaitable: Any) -> Any:
    """Await ``awaitable`` (a step before the request's items are queued), ending at once if it is withdrawn:
    a withdrawn request leaves the queue count now, not when its tokenization or test delay would have ended."""
    step = asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait({step, ticket.context[1]}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        step.cancel()
        raise
    if ticket.gone:
        step.cancel()
        raise _withdrawn()
    return step.result()


def _withdrawn() -> InternalError:
    """What a withdrawn request returns (nobody reads it: its caller is gone)."""
    return InternalError("the request was withdrawn: its caller went away")


def _deliver(delivered: list[tuple[QueuedItem, Outcome]]) -> None:
    """On the caller's event loop: record outcomes; a request whose items all have one gets them."""
    for item, outcome in delivered:
        ticket = item.ticket
        future = ticket.context[1]
        if future.done():  # withdrawn or cancelled meanwhile
            continue
        ticket.outcomes[item.index] = outcome
        ticket.remaining -= 1
        if ticket.remaining == 0:
            future.set_result(ticket.outcomes)


def _reward_or_raise(outcome: Outcome, index: int) -> float:
    if isinstance(outcome, RMServeError):
        if outcome.index == index:
            raise outcome
        raise item_error(type(outcome), index, outcome.detail, outcome.field)
    return outcome
