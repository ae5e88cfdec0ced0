"""The engine runs exactly the plan it priced: what ``plan(seqs)`` says a batch computes (padded and real tokens,
micro-batches, cost) is what ``run(plan)`` computed, with shared prefixes, duplicates, reward-cache hits, a cold
and a warm prefix cache, and several micro-batches per level."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
from checkpoints import unshared_rewards

from rmserve.model import ItemTooLargeForMemoryError
from rmserve.model.planning import StepIds, common_prefix_length, plan_levels

FP32_TOL = 1e-5


@pytest.fixture
def engine(demo_model):
    """The demo model's engine; every setting a test changes is restored afterwards."""
    engine = demo_model.engine
    saved = (engine.prefix_sharing, engine.prefix_cache.max_bytes, engine.reward_cache.max_items)
    budget, overhead = engine.max_batch_tokens, engine.overhead_tokens
    yield engine
    engine.max_batch_tokens, engine.overhead_tokens, engine.fault_injector = budget, overhead, None
    engine.configure_sharing(prefix_sharing=saved[0], prefix_cache_bytes=saved[1], reward_cache_items=saved[2])


def groups(rng: random.Random, sizes=(6, 4, 1), prompt=(30, 50), suffix=(3, 14)) -> list[list[int]]:
    """GRPO-like groups under one system prompt, plus exact duplicates and an unrelated item; shuffled."""
    system = [rng.randrange(3, 300) for _ in range(10)]
    seqs = []
    for n in sizes:
        head = system + [rng.randrange(3, 300) for _ in range(rng.randint(*prompt))]
        seqs += [head + [rng.randrange(3, 300) for _ in range(rng.randint(*suffix))] for _ in range(n)]
    seqs += [list(seqs[0]), list(seqs[0]), list(seqs[-1]), [rng.randrange(3, 300) for _ in range(7)]]
    rng.shuffle(seqs)
    return seqs


def run_and_compare(engine, seqs):
    """Plan, price, run; assert the stats moved by exactly what the plan said. Returns (plan, outcomes)."""
    stats = dataclasses.asdict(engine.stats)
    cache_bytes, reward_items = engine.prefix_cache.bytes, len(engine.reward_cache)
    plan = engine.plan(seqs)
    assert engine.batch_cost(seqs) == plan.cost
    assert dataclasses.asdict(engine.stats) == stats  # planning changed nothing
    assert (engine.prefix_cache.bytes, len(engine.reward_cache)) == (cache_bytes, reward_items)
    outcomes = engine.run(plan)
    after = engine.stats
    assert after.padded_tokens - stats["padded_tokens"] == plan.padded_tokens
    assert after.real_tokens - stats["real_tokens"] == plan.real_tokens
    assert after.microbatches - stats["microbatches"] == plan.forwards
    assert after.oom_splits == stats["oom_splits"]
    assert after.last_microbatch_sizes == [len(chunk) for level in plan.microbatches for chunk in level]
    assert after.reward_cache_hits - stats["reward_cache_hits"] == plan.reward_cache_hits
    assert after.prefix_hits - stats["prefix_hits"] == plan.prefix_hits
    assert plan.cost == math.ceil(plan.padded_tokens + plan.forwards * engine.overhead_tokens)
    return plan, outcomes


@pytest.mark.parametrize("overhead", [0.0, 7.5])
def test_run_computes_exactly_the_plan_it_priced(engine, overhead):
    rng = random.Random(21)
    first, second = groups(rng), groups(rng)
    # The second batch repeats some items (reward-cache hits) and extends the first batch's prompts (warm cache).
    second += first[:3] + [first[4][:-1] + [7, 8, 9]]
    want_first, want_second = unshared_rewards(engine, first), unshared_rewards(engine, second)
    engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=1 << 26, reward_cache_items=1024)
    engine.overhead_tokens, engine.max_batch_tokens = overhead, 160  # a small budget: several micro-batches a level

    cold, got = run_and_compare(engine, first)
    assert got == pytest.approx(want_first, abs=FP32_TOL)
    assert len(cold.microbatches) >= 2 and any(len(level) >= 2 for level in cold.microbatches)
    assert cold.reward_cache_hits >= 3  # the duplicates
    assert all(r.start == 0 for r in cold.microbatches[0][0])  # nothing cached yet

    warm, got = run_and_compare(engine, second)
    assert got == pytest.approx(want_second, abs=FP32_TOL)
    assert len(warm.answered) == len({tuple(s) for s in first[:3]})  # from the reward cache
    assert any(r.start > 0 and r.parent is None for r in warm.items)  # started on what the first batch left


def test_plans_without_sharing_and_with_a_cache_that_lives_one_batch(engine):
    seqs = groups(random.Random(3))
    want = unshared_rewards(engine, seqs)
    engine.max_batch_tokens = 120
    for sharing, cache_bytes in ((False, 0), (True, 0)):
        engine.configure_sharing(prefix_sharing=sharing, prefix_cache_bytes=cache_bytes, reward_cache_items=0)
        engine.overhead_tokens = 0.0
        plan, got = run_and_compare(engine, seqs)
        assert got == pytest.approx(want, abs=FP32_TOL)
        assert plan.forwards >= 2 and (len(plan.microbatches) >= 2) == sharing  # shared prefixes: levels
        assert engine.prefix_cache.bytes == 0


def test_a_plan_is_stale_once_the_engine_ran(engine):
    engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=1 << 24, reward_cache_items=16)
    plan = engine.plan([[5, 6, 7, 8]])
    engine.score_batch([[5, 6, 7, 9]])
    with pytest.raises(ValueError, match="stale"):
        engine.run(plan)
    assert engine.run(engine.plan([])) == []


def test_items_on_a_prefix_that_does_not_fit_get_its_error(engine):
    rng = random.Random(8)
    prompt = [rng.randrange(3, 300) for _ in range(40)]
    group = [prompt + [rng.randrange(3, 300) for _ in range(rng.randint(2, 6))] for _ in range(4)]
    others = [[rng.randrange(3, 300) for _ in range(n)] for n in (9, 12)]
    want = unshared_rewards(engine, others)
    engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=1 << 24, reward_cache_items=0)
    engine.overhead_tokens = 0.0

    def inject(rows, longest):
        if longest == len(prompt):  # any forward holding the shared prompt's row
            raise torch.OutOfMemoryError("injected")

    plan = engine.plan(group + others)
    assert [r.end for r in plan.microbatches[0][-1] if r.item is None] == [len(prompt)]
    engine.fault_injector = inject
    got = engine.run(plan)
    assert all(isinstance(o, ItemTooLargeForMemoryError) for o in got[:4])
    assert got[4:] == pytest.approx(want, abs=FP32_TOL)


def _known(stored: list[list[int]]):
    return lambda ids, limit: max((min(common_prefix_length(ids, s), limit) for s in stored), default=0)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("keeps", [False, True])
@pytest.mark.parametrize("min_start", [1, 4])
def test_planned_starts_are_what_matching_the_cache_at_run_time_finds(seed, keeps, min_start):
    """Every row's start, fixed at plan time, equals what matching the prefix cache just before the row runs would
    find (the cache before the batch plus whatever the earlier levels stored) when that is at least ``min_start``
    tokens, and 0 when it is shorter."""
    rng = random.Random(seed)
    vocab = rng.choice([3, 5, 50])  # a small vocabulary: many nested and accidental shared prefixes
    seqs = {tuple(rng.randrange(vocab) for _ in range(rng.randint(1, 30))) for _ in range(rng.randint(1, 40))}
    seqs |= {s[: rng.randint(1, len(s))] for s in list(seqs)[:5]}  # strict prefixes of other items
    seqs = sorted(seqs, key=lambda s: rng.random())
    before = [list(rng.choice(seqs))[: rng.randint(1, 20)] for _ in range(rng.randint(0, 4))]
    keep = (lambda ids: rng.choice([0, len(ids)])) if keeps else None  # an item kept whole, or not at all
    levels = plan_levels(seqs, _known(before), rng.choice([0, 3, 10]), keep=keep, min_start=min_start)
    stored = list(before)
    for k, level in enumerate(levels):
        for row in level:
            limit = row.end - 1 if row.item is not None else row.end
            found = _known(stored)(row.seq, limit)
            assert row.start == (found if found >= min_start else 0)
            if row.parent is not None:
                assert row.parent.end == row.start and row.parent in levels[k - 1]
        stored += [list(row.seq[: row.start + row.stored_tokens]) for row in level if row.stored_tokens]
    assert sorted(r.item for level in levels for r in level if r.item is not None) == list(range(len(seqs)))


def test_a_process_reward_item_keeps_its_prompt_at_first_sight_and_an_outcome_item_does_not():
    """Nothing seen before: a StepIds item keeps its states up to its first separator (its group's next sample starts
    there); an outcome item with the same ids keeps nothing (traffic that shares nothing copies nothing)."""
    ids = list(range(3, 63)) + [100, 101, 2, 102, 103, 2]
    nothing_cached, nothing_seen = (lambda seq, limit: 0), (lambda seq: 0)
    ((step_row,),) = plan_levels([StepIds(ids, readouts=(62, 65))], nothing_cached, 0, keep=nothing_seen)
    assert step_row.store and step_row.start + step_row.stored_tokens == 62
    ((outcome_row,),) = plan_levels([ids], nothing_cached, 0, keep=nothing_seen)
    assert not outcome_row.store and outcome_row.stored_tokens == 0
    ((unkept,),) = plan_levels([StepIds(ids, readouts=(62, 65))], nothing_cached, 0, keep=None)
    assert not unkept.store  # prefix sharing off: nothing is kept


def test_common_prefix_length_at_every_place_the_ids_can_differ():
    rng = random.Random(3)
    base = [rng.randrange(1000) for _ in range(300)]
    assert common_prefix_length([], base) == 0 and common_prefix_length(base, base) == 300
    assert common_prefix_length(base[:130], tuple(base)) == 130  # a list and a tuple, one a prefix of the other
    for at in [0, 1, 62, 63, 64, 65, 127, 128, 129, 200, 299]:
        other = list(base)
        other[at] += 1
        assert common_prefix_length(tuple(base), other) == at
        assert common_prefix_length(other[: at + 1], base[: at + 5]) == at
