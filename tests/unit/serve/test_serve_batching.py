"""The Scorer's batch cost (the batch_size_fn) and batch statistics, without Ray."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from rmserve.serve.batching import BatchLimits, BatchStats, EngineFeeder, batch_cost, item_cost, padded_cost


def test_item_and_padded_cost():
    assert item_cost(17) == 17
    assert padded_cost([]) == 0
    assert padded_cost([3]) == 3
    assert padded_cost([100, 300, 7]) == 900  # 3 rows x 300


def test_batch_cost_counts_padded_tokens_until_the_budget():
    limits = BatchLimits(max_batch_tokens=1000, max_batch_items=100)
    assert batch_cost([], limits) == 0
    assert batch_cost([100, 300], limits) == 600
    assert batch_cost([100, 300, 400], limits) == 1200  # over the budget: Ray leaves the last item for the next batch


def test_a_single_over_long_item_still_fits_alone():
    limits = BatchLimits(max_batch_tokens=1000, max_batch_items=100)
    assert batch_cost([5000], limits) == 1000  # == budget: the batch closes with this item alone
    assert batch_cost([5000, 1], limits) > 1000


def test_item_cap_makes_a_batch_over_budget():
    limits = BatchLimits(max_batch_tokens=1000, max_batch_items=4)
    assert batch_cost([1] * 4, limits) == 4
    assert batch_cost([1] * 5, limits) == 1001


def test_greedy_fill_respects_both_limits():
    """What Ray does with batch_size_fn: add items while the cost stays within the budget."""
    limits = BatchLimits(max_batch_tokens=64, max_batch_items=3)
    queue, batches = [10, 20, 5, 30, 30, 40, 1, 1, 1, 1], []
    while queue:
        batch = [queue.pop(0)]
        while queue and batch_cost([*batch, queue[0]], limits) <= limits.max_batch_tokens:
            batch.append(queue.pop(0))
        batches.append(batch)
    assert batches == [[10, 20, 5], [30, 30], [40], [1, 1, 1], [1]]
    for batch in batches:
        assert len(batch) <= 3 and (len(batch) == 1 or padded_cost(batch) <= 64)


def test_batch_stats():
    stats = BatchStats()
    assert stats.mean_batch_size == 0.0
    stats.record([4, 2])
    stats.record([3], merged=2)
    stats.record([1, 1, 1, 5])
    snap = stats.snapshot()
    assert (snap["batches"], snap["merged_batches"], snap["items"], snap["largest_batch"]) == (3, 1, 7, 4)
    assert snap["real_tokens"] == 17 and snap["padded_tokens"] == 8 + 3 + 20
    assert snap["mean_batch_size"] == pytest.approx(7 / 3, rel=1e-12)
    assert snap["recent_batch_sizes"] == [2, 1, 4]


class BlockingScorer:
    """A plain scoring function (reward = length) whose first run blocks until released."""

    def __init__(self):
        self.calls: list[list[int]] = []
        self.release = threading.Event()

    def __call__(self, sequences):
        self.calls.append([len(s) for s in sequences])
        if len(self.calls) == 1:
            assert self.release.wait(10)
        return [float(len(s)) for s in sequences]


async def test_feeder_merges_batches_that_wait_for_a_running_forward():
    scorer = BlockingScorer()
    runs: list[tuple[list[int], int]] = []
    with ThreadPoolExecutor(1) as pool:
        feeder = EngineFeeder(scorer, BatchLimits(1000, 100), pool, lambda lengths, n: runs.append((lengths, n)))
        first = asyncio.create_task(feeder.score([[1] * 3]))
        while not scorer.calls:  # the first forward is running (blocked)
            await asyncio.sleep(0.001)
        waiting = [asyncio.create_task(feeder.score([[1] * n, [1] * (n + 1)])) for n in (4, 6, 8)]
        await asyncio.sleep(0.01)
        scorer.release.set()
        assert await first == [3.0]
        assert await asyncio.gather(*waiting) == [[4.0, 5.0], [6.0, 7.0], [8.0, 9.0]]  # each gets its own rewards
    assert scorer.calls == [[3], [4, 5, 6, 7, 8, 9]]  # one forward for the three waiting batches
    assert runs == [([3], 1), ([4, 5, 6, 7, 8, 9], 3)]


async def test_feeder_merges_only_within_the_limits_and_skips_cancelled_batches():
    scorer = BlockingScorer()
    with ThreadPoolExecutor(1) as pool:
        feeder = EngineFeeder(scorer, BatchLimits(max_batch_tokens=40, max_batch_items=3), pool)
        first = asyncio.create_task(feeder.score([[1] * 2]))
        while not scorer.calls:
            await asyncio.sleep(0.001)
        a = asyncio.create_task(feeder.score([[1] * 10, [1] * 10]))  # 20 padded tokens
        gone = asyncio.create_task(feeder.score([[1] * 5]))
        b = asyncio.create_task(feeder.score([[1] * 10]))  # a + b: 3 rows x 10 = 30 <= 40
        c = asyncio.create_task(feeder.score([[1] * 10]))  # a + b + c: 4 items > 3
        await asyncio.sleep(0.01)
        gone.cancel()
        scorer.release.set()
        assert (await first, await a, await b, await c) == ([2.0], [10.0, 10.0], [10.0], [10.0])
    assert scorer.calls == [[2], [10, 10, 10], [10]]  # the cancelled batch never ran


async def test_feeder_passes_a_failure_to_every_batch_of_the_run():
    def broken(sequences):
        raise RuntimeError("boom")

    with ThreadPoolExecutor(1) as pool:
        feeder = EngineFeeder(broken, BatchLimits(), pool)
        with pytest.raises(RuntimeError, match="boom"):
            await feeder.score([[1, 2]])
        with pytest.raises(RuntimeError, match="boom"):  # the feeder keeps working after a failure
            await feeder.score([[1]])
