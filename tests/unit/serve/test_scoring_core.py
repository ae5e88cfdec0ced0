"""The Scorer's plain-Python core with the real demo model, no Ray: rewards, shared batches, admission (413/429),
clients that leave (cancelled, or withdrawn from a merged Gateway call), whole-batch failures rescored item by item,
and out-of-memory splits.

A ``Gate`` on the engine's fault hook holds the forward thread inside one forward (of a chosen width) until the test
opens it, so what queues behind it, and what leaves, is decided by the test, not by timing.
"""

from __future__ import annotations

import asyncio

import pytest
from engine_gate import GATE_WIDTH, Gate

from rmserve.model import load_reward_model
from rmserve.model.errors import InternalError, OverloadedError, RequestTooLargeError
from rmserve.serve.config.settings import BatchingConfig, LimitsConfig
from rmserve.serve.core.faults import FaultPlan
from rmserve.serve.core.scoring_core import ScoringCore
from rmserve.serve.edge.protocol import ScoredItems

TOL = 1e-5


@pytest.fixture(scope="module")
def model(demo_model_dir):
    """A copy of the demo model of its own: the core attaches observers and fault hooks to its engine."""
    return load_reward_model(str(demo_model_dir), dtype="fp32", device="cpu")


@pytest.fixture
def core(model):
    core = ScoringCore(model, BatchingConfig(batch_wait_timeout_s=0.0), LimitsConfig(max_queued_items=256))
    yield core
    core.close()
    model.engine.observers.clear()
    model.engine.fault_injector = None


def ids(length: int, seed: int = 0) -> list[int]:
    return [5 + (seed * 31 + k * 7) % 500 for k in range(length)]


def items_of(length: int, count: int, seed: int = 0) -> list[dict]:
    return [{"input_ids": ids(length, seed + k)} for k in range(count)]


async def until(condition, what: str) -> None:
    """Await a condition the core reaches on its own threads (bounded, never a fixed sleep)."""
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting until {what}")


async def hold_the_forward(core: ScoringCore) -> tuple[Gate, asyncio.Task]:
    """Start a request whose forward waits at a gate; returns once the forward thread is inside it."""
    gate = Gate()
    core.model.engine.fault_injector = gate
    task = asyncio.ensure_future(core.score_request([{"input_ids": ids(GATE_WIDTH, 99)}]))
    await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 60)
    return gate, task


async def test_concurrent_requests_get_their_own_rewards_from_shared_batches(core, demo_model):
    requests = [items_of(8 + k % 13, 1 + k % 3, seed=k) for k in range(40)]
    before = core.stats()["batching"]
    results = await asyncio.gather(*(core.score_request(items) for items in requests))
    for result, items in zip(results, requests, strict=True):
        assert isinstance(result, ScoredItems), result
        assert result.rewards == pytest.approx(demo_model.score(items), abs=TOL)
    after = core.stats()
    n_items = sum(len(items) for items in requests)
    assert after["batching"]["items"] - before["items"] == n_items
    assert after["batching"]["batches"] - before["batches"] < len(requests)  # requests shared forwards
    assert after["queued_items"] == 0


async def test_batches_take_what_waits_up_to_the_budget_the_engine_prices(core, model):
    core.configure(BatchingConfig(max_batch_tokens=256, batch_wait_timeout_s=0.0), 64)
    # Caches off: the prices are re-checked after the batches ran, when cached prefixes or rewards would lower them.
    model.engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=0, reward_cache_items=0)
    model.engine.overhead_tokens = 16  # not the overhead measured at load, which varies from run to run
    gate, held = await hold_the_forward(core)
    taken: list[list] = []
    take = core.queue.take

    def recording_take():  # the forward thread's next batches (it is inside the held forward now)
        batch = take()
        if batch:
            taken.append([q.input_ids for q in batch.items])
            assert batch.plan.cost == model.engine.batch_cost(taken[-1])  # the plan it runs is the one priced
        return batch

    core.queue.take = recording_take
    lengths = (20, 90, 35, 120, 15, 60, 44, 70)
    tasks = [asyncio.ensure_future(core.score_request(items_of(n, 1, seed=n))) for n in lengths]
    await until(lambda: len(core.queue) == len(lengths), "every item is queued behind the held forward")
    gate.release.set()
    results = await asyncio.gather(held, *tasks)
    assert all(isinstance(r, ScoredItems) for r in results)
    assert sorted(len(s) for batch in taken for s in batch) == sorted(lengths)  # each item in one batch
    assert len(taken) > 1
    for k, batch in enumerate(taken):
        assert model.engine.batch_cost(batch) <= 256
        if k + 1 < len(taken):  # it took as much as fitted: the next waiting item would have broken the budget
            assert model.engine.batch_cost([*batch, taken[k + 1][0]]) > 256
    assert core.stats()["limits"]["max_batch_tokens"] == model.engine.max_batch_tokens == 256


async def test_admission_refuses_too_large_and_overfull_requests(core):
    core.configure(BatchingConfig(), max_queued_items=4)
    assert isinstance(await core.score_request(items_of(10, 5)), RequestTooLargeError)
    gate, held = await hold_the_forward(core)  # 1 item admitted
    waiting = asyncio.ensure_future(core.score_request(items_of(10, 3)))
    await until(lambda: len(core.queue) == 3, "3 items wait")
    refused = await core.score_request(items_of(10, 1))
    assert isinstance(refused, OverloadedError) and refused.retry_after == 1
    assert core.stats()["rejected_requests"] == 1
    assert core.metrics_snapshot().get("rejected_requests") == 1
    assert core.metrics_snapshot().get("queue_depth") == 4
    gate.release.set()
    assert all(isinstance(r, ScoredItems) for r in await asyncio.gather(held, waiting))
    assert core.stats()["queued_items"] == 0


async def test_a_cancelled_request_never_reaches_a_forward_and_its_neighbours_keep_their_place(core, demo_model):
    gate, held = await hold_the_forward(core)
    victim = asyncio.ensure_future(core.score_request(items_of(20, 5, seed=1)))
    neighbour_items = items_of(21, 3, seed=2)
    neighbour = asyncio.ensure_future(core.score_request(neighbour_items))
    await until(lambda: len(core.queue) == 8, "victim and neighbour are queued")
    engine_items = core.model.engine.stats.items
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim
    assert len(core.queue) == 3  # the neighbour's items stay where they were
    gate.release.set()
    _, result = await asyncio.gather(held, neighbour)
    assert result.rewards == pytest.approx(demo_model.score(neighbour_items), abs=TOL)
    assert (
        core.model.engine.stats.items - engine_items == 3
    )  # the neighbour's (the held one counted already), never the 5
    assert core.stats()["client_gone_items"] == 5
    assert core.metrics_snapshot().get("client_gone_items") == 5
    assert core.stats()["queued_items"] == 0


async def test_a_withdrawn_request_of_a_merged_call_costs_nobody_else_anything(core, demo_model):
    gate, held = await hold_the_forward(core)
    a, b, c = items_of(22, 2, seed=3), items_of(23, 4, seed=4), items_of(24, 1, seed=5)
    call = asyncio.ensure_future(core.score_requests([(a, False, "g:1"), (b, False, "g:2"), (c, False, "g:3")]))
    await until(lambda: len(core.queue) == 7, "the call's items are queued")
    engine_items = core.model.engine.stats.items
    core.withdraw(["g:2"])
    assert len(core.queue) == 3
    gate.release.set()
    await held
    results = await call
    assert results[0].rewards == pytest.approx(demo_model.score(a), abs=TOL)
    assert isinstance(results[1], InternalError)  # nobody reads it: its caller is gone
    assert results[2].rewards == pytest.approx(demo_model.score(c), abs=TOL)
    assert core.model.engine.stats.items - engine_items == 2 + 1  # the held item was counted when its batch began
    assert core.stats()["client_gone_items"] == 4
    assert core.stats()["gateway_calls"] == {"calls": 1, "requests": 3}


async def test_a_withdrawal_that_arrives_before_its_request_still_drops_it(core):
    engine_items = core.model.engine.stats.items
    core.withdraw(["g:early"])
    result = await core.score_request(items_of(12, 3), False, "g:early")
    assert isinstance(result, InternalError)
    assert core.stats()["client_gone_items"] == 3 and core.stats()["queued_items"] == 0
    assert core.model.engine.stats.items == engine_items


async def test_a_failing_batch_is_rescored_item_by_item_and_only_the_culprit_fails(core, demo_model):
    gate, held = await hold_the_forward(core)
    good = [items_of(15, 2, seed=6), items_of(16, 1, seed=7)]
    culprit = items_of(33, 1, seed=8)
    tasks = [asyncio.ensure_future(core.score_request(items)) for items in (good[0], culprit, good[1])]
    await until(lambda: len(core.queue) == 4, "the three requests are queued together")
    plan = FaultPlan(fail_on_length=33).engine_hook()
    core.model.engine.fault_injector = lambda rows, width: (gate(rows, width), plan(rows, width))
    gate.release.set()
    await held
    first, failed, second = await asyncio.gather(*tasks)
    assert first.rewards == pytest.approx(demo_model.score(good[0]), abs=TOL)
    assert second.rewards == pytest.approx(demo_model.score(good[1]), abs=TOL)
    assert isinstance(failed, InternalError) and "/internal/detail" not in failed.message  # sanitised
    assert core.stats()["rescored_batches"] == 1


async def test_an_out_of_memory_batch_is_split_and_scored(core, demo_model):
    core.set_faults(FaultPlan(oom_on_length=37))
    items = items_of(37, 4, seed=9)
    result = await core.score_request(items)
    assert result.rewards == pytest.approx(demo_model.score(items), abs=TOL)
    assert core.metrics_snapshot().get("oom_splits") >= 1


async def test_request_delays_from_the_fault_plan_hold_a_request_before_it_queues(core):
    core.set_faults(FaultPlan(delays={41: 3600.0}))
    task = asyncio.ensure_future(core.score_request(items_of(41, 2)))
    await until(lambda: core.queued_items == 2, "the request is admitted")
    assert len(core.queue) == 0  # held before the queue
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert core.stats()["client_gone_items"] == 2 and core.stats()["queued_items"] == 0


async def test_a_request_withdrawn_while_it_waits_to_be_queued_ends_at_once(core):
    core.set_faults(FaultPlan(delays={43: 3600.0}))
    call = asyncio.ensure_future(core.score_requests([(items_of(43, 2), False, "g:held")]))
    await until(lambda: core.queued_items == 2, "the request is admitted")
    core.withdraw(["g:held"])
    [result] = await call  # without waiting out the hour
    assert isinstance(result, InternalError)
    assert core.stats()["queued_items"] == 0 and core.stats()["client_gone_items"] == 2


async def test_a_merged_request_gets_its_answer_without_waiting_for_a_slower_one(core, demo_model):
    core.set_faults(FaultPlan(delays={44: 30.0}))  # the slow request waits 30 s before it is queued
    fast = items_of(10, 1, seed=6)
    stream = core.score_requests_as_completed([(items_of(44, 1, seed=7), False, "s:1"), (fast, False, "s:2")])
    try:
        index, result = await stream.__anext__()
    finally:
        await stream.aclose()  # the Gateway stops listening: the slow request is cancelled
    assert index == 1 and result.rewards == pytest.approx(demo_model.score(fast), abs=TOL)
    await until(lambda: core.stats()["queued_items"] == 0, "the slow request left the queue count")


async def test_stats_and_metrics_read_the_same_counters_and_start_with_the_core(model):
    """One store per number: the snapshot (``/metrics``) and ``stats()`` agree, and a forward before the core
    existed (a Scorer's warm-up) is in neither."""
    model.score([{"text": "warm-up"}])
    core = ScoringCore(model, BatchingConfig(batch_wait_timeout_s=0.0), LimitsConfig(max_queued_items=256))
    try:
        requests = [items_of(9 + k, 2, seed=200 + 10 * k) for k in range(5)]
        results = await asyncio.gather(*(core.score_request(items) for items in requests))
        usage = sum(result.input_tokens for result in results)
        snapshot, stats = core.metrics_snapshot(), core.stats()
        assert snapshot.get("items_scored") == stats["engine"]["items"] == stats["batching"]["items"] == 10
        assert snapshot.get("input_tokens") == usage == stats["engine"]["received_tokens"]
        assert snapshot.get("forward_real_tokens") == stats["engine"]["real_tokens"]
        assert snapshot.get("forward_padded_tokens") == stats["engine"]["padded_tokens"]
        assert snapshot.get("forward_real_tokens") + snapshot.get("prefix_tokens_saved") == usage
        sizes = snapshot.histogram("batch_size_items")
        assert (sizes.count, sizes.sum) == (stats["batching"]["batches"], 10)
        assert snapshot.histogram("batch_padded_tokens").sum == snapshot.get("forward_padded_tokens")
    finally:
        core.close()
        model.engine.observers.clear()
