"""Batching for the Scorer, testable without Ray or torch: what an item and a batch cost in tokens,
``EngineFeeder`` (one forward at a time; batches that wait for it are merged), and batch statistics.

Ray Serve's ``@serve.batch`` closes a batch when ``batch_size_fn(items)`` reaches ``max_batch_size``
or the wait timeout passes. The Scorer sets ``max_batch_size`` to the token budget and uses
``batch_cost`` as ``batch_size_fn``, so a batch closes on padded tokens (rows x longest row), not on
a count of requests.

Example::

    limits = BatchLimits(max_batch_tokens=1024, max_batch_items=8)
    batch_cost([100, 300], limits)        # 600: two rows padded to 300
    batch_cost([5000], limits)            # 1024: one item always fits, alone
    batch_cost([10] * 9, limits)          # 1025: too many items, over the budget
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BatchLimits:
    """The two limits of one batch; mutable so ``reconfigure`` can change them at runtime."""

    max_batch_tokens: int = 16384
    max_batch_items: int = 256


def item_cost(length: int) -> int:
    """Tokens one item computes alone (its length; no padding)."""
    return length


def padded_cost(lengths: Sequence[int]) -> int:
    """Tokens a right-padded batch computes: rows x longest row."""
    return len(lengths) * max(lengths, default=0)


def batch_cost(lengths: Sequence[int], limits: BatchLimits) -> int:
    """The ``batch_size_fn`` value of a batch of items with these token lengths.

    Padded tokens, except that a single item is capped at the budget (an over-long item still gets a
    batch of its own instead of an error) and a batch with more than ``max_batch_items`` items costs
    more than the budget (so it never forms).
    """
    if not lengths:
        return 0
    if len(lengths) > limits.max_batch_items:
        return limits.max_batch_tokens + 1
    if len(lengths) == 1:
        return min(item_cost(lengths[0]), limits.max_batch_tokens)
    return padded_cost(lengths)


class EngineFeeder:
    """Runs batches through a scoring function one at a time, on an executor thread; batches that arrive
    while one runs are merged into the next run, up to the same ``BatchLimits``.

    ``@serve.batch`` closes a batch on its budget or its wait timeout (milliseconds), which can be far
    shorter than one forward pass of a large model. Unmerged, the batches formed during a long forward
    would queue and run one after another, each small; merged, the next forward takes what waited.

    Example::

        feeder = EngineFeeder(engine.score_batch, limits, ThreadPoolExecutor(1))
        await feeder.score([[1, 5, 9], [1, 7]])   # -> [0.31, -1.2], merged with concurrent callers
    """

    def __init__(
        self,
        run: Callable[[list[Sequence[int]]], list[Any]],
        limits: BatchLimits,
        executor: Executor,
        on_run: Callable[[list[int], int], None] | None = None,
    ):
        self._run = run
        self._limits = limits
        self._executor = executor
        self._on_run = on_run  # called with (the lengths of one run, how many batches it merged)
        self._waiting: deque[tuple[list[Sequence[int]], asyncio.Future]] = deque()
        self._draining = False

    async def score(self, sequences: list[Sequence[int]]) -> list[Any]:
        """The outcomes for ``sequences``, in order (from one run, shared with other waiting batches)."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((sequences, future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    def _take(self) -> list[tuple[list[Sequence[int]], asyncio.Future]]:
        """The oldest waiting batch plus the following ones while the merged batch stays within the limits."""
        group, lengths = [], []
        while self._waiting:
            sequences, future = self._waiting[0]
            if future.cancelled():
                self._waiting.popleft()
                continue
            merged = lengths + [len(s) for s in sequences]
            if group and batch_cost(merged, self._limits) > self._limits.max_batch_tokens:
                break
            group.append(self._waiting.popleft())
            lengths = merged
        return group

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while group := self._take():
                merged = [s for sequences, _ in group for s in sequences]
                try:
                    outcomes = await loop.run_in_executor(self._executor, self._run, merged)
                except Exception as exc:
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                if self._on_run is not None:
                    self._on_run([len(s) for s in merged], len(group))
                start = 0
                for sequences, future in group:
                    if not future.done():
                        future.set_result(outcomes[start : start + len(sequences)])
                    start += len(sequences)
        finally:
            self._draining = False


@dataclass
class BatchStats:
    """Running statistics of the batches a Scorer ran (read by tests and, later, metrics)."""

    batches: int = 0  # forward runs (after merging)
    merged_batches: int = 0  # runs that merged more than one @serve.batch batch
    items: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    largest_batch: int = 0
    recent_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1024))

    def record(self, lengths: Sequence[int], merged: int = 1) -> None:
        self.batches += 1
        self.merged_batches += merged > 1
        self.items += len(lengths)
        self.real_tokens += sum(lengths)
        self.padded_tokens += padded_cost(lengths)
        self.largest_batch = max(self.largest_batch, len(lengths))
        self.recent_sizes.append(len(lengths))

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    def snapshot(self) -> dict:
        return {
            "batches": self.batches,
            "merged_batches": self.merged_batches,
            "items": self.items,
            "real_tokens": self.real_tokens,
            "padded_tokens": self.padded_tokens,
            "largest_batch": self.largest_batch,
            "mean_batch_size": self.mean_batch_size,
            "recent_batch_sizes": list(self.recent_sizes),
        }
