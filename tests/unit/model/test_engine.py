"""Micro-batch planning, last-token gathering and out-of-memory splitting."""

from __future__ import annotations

import math

import pytest
import torch

from rmserve.model import ItemTooLargeForMemoryError, last_token_index, padded_tokens, plan_microbatches
from rmserve.model.errors import InternalError


@pytest.mark.parametrize(
    ("lengths", "budget"),
    [([1, 2, 3, 4, 5, 6, 7, 8], 10), ([5] * 20, 20), ([3, 3, 50, 60], 100), ([100, 200], 50), ([], 10), ([7], 1)],
)
def test_plan_covers_everything_in_order_and_fits(lengths, budget):
    plan = plan_microbatches(lengths, budget)
    assert [i for s, e in plan for i in range(s, e)] == list(range(len(lengths)))
    for s, e in plan:
        assert e - s == 1 or padded_tokens(lengths[s:e]) <= budget


def _brute_force_cost(lengths, budget, overhead):
    """Cheapest cost over every way to cut the sorted list into fitting contiguous runs."""
    from itertools import product

    n, best = len(lengths), float("inf")
    for cuts in product([0, 1], repeat=n - 1):
        runs, start = [], 0
        for k, c in enumerate(cuts, start=1):
            if c:
                runs.append((start, k))
                start = k
        runs.append((start, n))
        if all(e - s == 1 or padded_tokens(lengths[s:e]) <= budget for s, e in runs):
            best = min(best, sum(padded_tokens(lengths[s:e]) + overhead for s, e in runs))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_plan_is_optimal(seed):
    import random

    rng = random.Random(seed)
    lengths = sorted(rng.randint(1, 40) for _ in range(9))
    budget, overhead = rng.choice([40, 80, 150]), rng.choice([0, 10])
    plan = plan_microbatches(lengths, budget, overhead)
    cost = sum(padded_tokens(lengths[s:e]) + overhead for s, e in plan)
    assert cost == _brute_force_cost(lengths, budget, overhead)


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 0, 3]
    assert last_token_index(left).tolist() == [3, 3, 3]


def _oom_above(rows_limit):
    def inject(rows, width):
        if rows > rows_limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    return inject


def test_oom_splits_and_retries_with_identical_rewards(demo_model, unshared):
    items = [{"prompt": f"Tell me about item {i}.", "response": "Gladly! " * (i % 5 + 1)} for i in range(16)]
    want = demo_model.score(items)
    splits = demo_model.engine.stats.oom_splits
    demo_model.engine.fault_injector = _oom_above(3)
    try:
        got = demo_model.score(items)
    finally:
        demo_model.engine.fault_injector = None
    assert got == pytest.approx(want, abs=1e-5)
    assert demo_model.engine.stats.oom_splits - splits >= 3


def test_item_that_never_fits_gets_typed_error_others_unaffected(demo_model, unshared):
    items = [{"prompt": "Tea?", "response": "Of course. Tea is lovely."}] * 3
    items.append({"prompt": "Tea? " * 60, "response": "Of course."})
    seqs = [demo_model.tokenize(it).input_ids for it in items]
    want = demo_model.score(items[:3])
    long_len = len(seqs[-1])

    def inject(rows, width):
        if width >= long_len:
            raise torch.OutOfMemoryError("injected")

    demo_model.engine.fault_injector = inject
    try:
        outcomes = demo_model.engine.score_batch(seqs)
    finally:
        demo_model.engine.fault_injector = None
    assert isinstance(outcomes[3], ItemTooLargeForMemoryError)
    assert outcomes[:3] == pytest.approx(want, abs=1e-5)


def test_non_finite_reward_is_an_error_not_a_number(demo_model):
    head = demo_model.engine.head
    saved = head.weight.detach().clone()
    with torch.no_grad():
        head.weight.fill_(math.nan)
    try:
        outcomes = demo_model.engine.score_batch([[1, 5, 6], [1, 7]])
    finally:
        with torch.no_grad():
            head.weight.copy_(saved)
    assert all(isinstance(o, InternalError) for o in outcomes)


def test_non_oom_errors_propagate(demo_model):
    def inject(rows, width):
        raise ValueError("boom")

    demo_model.engine.fault_injector = inject
    try:
        with pytest.raises(ValueError):
            demo_model.engine.score_batch([[1, 2, 3]])
    finally:
        demo_model.engine.fault_injector = None
