"""Sleep and wake without Ray or HTTP: ``model.residency`` on a real checkpoint, and ``ScoringCore.sleep`` /
``wake_up`` around requests (the admitted ones finish, new ones get 503 ``sleeping``, rewards after a wake equal those
before bit for bit), the metrics they record, and the metrics store's ``min`` merge of the sleep level.

A ``Gate`` on the engine's fault hook holds the forward thread inside a forward, and a gate on the residency's wake
holds a wake up half-way, so what arrives during a transition is decided by the test, not by timing.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from engine_gate import GATE_WIDTH, Gate

from rmserve.model import load_reward_model
from rmserve.model.errors import InvalidRequestError, SleepingError
from rmserve.model.residency import WeightResidency, check_level
from rmserve.serve.config.settings import BatchingConfig, LimitsConfig
from rmserve.serve.core.scoring_core import ScoringCore
from rmserve.serve.edge.errors import error_response
from rmserve.serve.metrics.store import MetricsRecorder, merge

ITEMS = [
    {"prompt": "What is the capital of France?", "response": "Paris, a city on the Seine."},
    {"prompt": "Name a prime.", "response": "Seven."},
    {"text": "A plain text item to score."},
]


@pytest.fixture
def model(demo_model_dir):
    """A copy of the demo model of its own (sleep replaces its weights)."""
    return load_reward_model(str(demo_model_dir), dtype="fp32", device="cpu", forward_overhead_tokens=64)


@pytest.fixture
def core(model):
    core = ScoringCore(model, BatchingConfig(batch_wait_timeout_s=0.0), LimitsConfig(max_queued_items=64))
    yield core
    core.close()


def gated_ids(length: int = GATE_WIDTH) -> list[int]:
    return [5 + (k * 7) % 500 for k in range(length)]


async def turns_until(condition, turns: int = 100) -> None:
    """Let the event loop run until ``condition`` holds (a bounded number of turns, no clock)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition did not hold")


def weights_of(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.engine.backbone.named_parameters()}


# -- the mechanism -----------------------------------------------------------------------------------------------
def test_level_1_on_cpu_keeps_the_weights_and_drops_the_caches(model):
    before = model.score(ITEMS)
    model.score(ITEMS)  # now in the reward cache
    assert len(model.engine.reward_cache) == len(ITEMS)
    backbone = model.engine.backbone
    residency = WeightResidency(model)
    residency.sleep(1)
    assert residency.level == 1
    assert len(model.engine.reward_cache) == 0 and model.engine.prefix_cache.bytes == 0
    assert model.engine.backbone is backbone  # on a CPU the weights already are in host memory
    residency.wake()
    assert residency.level == 0
    assert model.score(ITEMS) == before


def test_level_2_drops_the_weights_and_reloads_the_same_bits(model):
    before, weights = model.score(ITEMS), weights_of(model)
    residency = WeightResidency(model)
    residency.sleep(2)
    assert not list(model.engine.backbone.parameters())  # nothing left of the weights
    with pytest.raises(RuntimeError, match="dropped"):
        model.engine.score_batch([[5, 6, 7]])
    residency.sleep(2)  # idempotent
    residency.wake()
    assert residency.level == 0
    reloaded = weights_of(model)
    assert reloaded.keys() == weights.keys()
    assert all(torch.equal(reloaded[name], weights[name]) for name in weights)
    assert model.engine.head.weight.dtype == torch.float32
    assert model.score(ITEMS) == before  # bit for bit (fp32)
    residency.wake()  # idempotent
    assert model.score(ITEMS) == before


def test_level_1_moves_the_weights_to_pinned_host_memory_and_back(demo_model_dir, device):
    if not device.startswith("cuda"):
        pytest.skip("needs an accelerator (RMSERVE_TEST_DEVICE=cuda)")
    model = load_reward_model(str(demo_model_dir), dtype="fp32", device=device, forward_overhead_tokens=64)
    before, weights = model.score(ITEMS), weights_of(model)
    torch.cuda.synchronize()
    awake = torch.cuda.memory_allocated()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.engine.backbone.parameters())
    residency = WeightResidency(model)
    residency.sleep(1)
    assert all(p.device.type == "cpu" and p.is_pinned() for p in model.engine.backbone.parameters())
    assert torch.cuda.memory_allocated() <= awake - weight_bytes
    residency.wake()
    assert all(p.device.type == "cuda" for p in model.engine.backbone.parameters())
    assert all(torch.equal(p.detach().cpu(), weights[n].cpu()) for n, p in model.engine.backbone.named_parameters())
    assert model.score(ITEMS) == before


@pytest.mark.parametrize("level", [0, 3, True, "1", None, 2.0])
def test_only_levels_1_and_2_exist(level):
    with pytest.raises(InvalidRequestError) as info:
        check_level(level)
    assert info.value.param == "level" and info.value.status == 422


# -- the core ----------------------------------------------------------------------------------------------------
async def test_sleep_waits_for_admitted_work_then_refuses_until_woken(core, model):
    before = (await core.score_request(ITEMS)).rewards
    gate = Gate()
    model.engine.fault_injector = gate
    in_forward = asyncio.ensure_future(core.score_request([{"input_ids": gated_ids()}]))
    await asyncio.to_thread(gate.entered.wait, 60)
    falling = asyncio.ensure_future(core.sleep(2))
    await turns_until(lambda: core.sleep_state == "falling asleep")
    assert not core.is_sleeping()
    refused = await core.score_request(ITEMS)
    assert isinstance(refused, SleepingError) and "falling asleep" in refused.message
    assert not falling.done()  # it waits for the request in the forward
    gate.release.set()
    scored = await in_forward
    assert not isinstance(scored, Exception) and len(scored.rewards) == 1  # admitted: scored to the end
    assert await falling == 2
    assert core.is_sleeping() and core.sleep_level == 2

    asleep = await core.score_request(ITEMS)
    assert isinstance(asleep, SleepingError)
    assert asleep.status == 503 and asleep.type == "sleeping" and asleep.retry_after == core.retry_after_s
    assert "asleep (level 2)" in asleep.message
    response = error_response(asleep)
    assert response.status_code == 503 and response.headers["retry-after"] == str(core.retry_after_s)
    assert await core.sleep(1) == 2  # asleep already: stays at its level
    assert core.queued_items == 0

    await core.wake_up()
    await core.wake_up()  # idempotent
    assert not core.is_sleeping() and core.sleep_state == "awake"
    assert (await core.score_request(ITEMS)).rewards == before

    snapshot = core.metrics_snapshot()
    model_id = model.model_id
    assert snapshot.get("sleep_level", model=model_id) == 0
    for transition in ("sleep", "wake"):
        timing = snapshot.histogram("sleep_transition_seconds", model=model_id, transition=transition, level="2")
        assert timing.count == 1 and timing.sum > 0


async def test_a_request_during_wake_up_gets_the_sleeping_answer(core, model):
    before = (await core.score_request(ITEMS)).rewards
    await core.sleep(1)
    assert core.metrics_snapshot().get("sleep_level", model=model.model_id) == 1
    entered, release = threading.Event(), threading.Event()
    wake = core.residency.wake

    def held_wake() -> None:
        entered.set()
        release.wait(60)
        wake()

    core.residency.wake = held_wake
    waking = asyncio.ensure_future(core.wake_up())
    await asyncio.to_thread(entered.wait, 60)
    refused = await core.score_request(ITEMS)
    assert isinstance(refused, SleepingError) and "waking up" in refused.message
    assert core.is_sleeping()  # until the weights are back
    release.set()
    await waking
    assert (await core.score_request(ITEMS)).rewards == before


async def test_concurrent_sleeps_and_a_caller_that_leaves(core, model):
    gate = Gate()
    model.engine.fault_injector = gate
    in_forward = asyncio.ensure_future(core.score_request([{"input_ids": gated_ids()}]))
    await asyncio.to_thread(gate.entered.wait, 60)
    first, second = asyncio.ensure_future(core.sleep(1)), asyncio.ensure_future(core.sleep(2))
    await turns_until(lambda: core.sleep_state == "falling asleep")
    first.cancel()  # its caller stopped waiting: the sleep goes on
    gate.release.set()
    await in_forward
    assert await second == 1  # the first sleep won; the second found the model asleep
    assert core.sleep_level == 1
    with pytest.raises(asyncio.CancelledError):
        await first
    await core.wake_up()
    assert core.sleep_state == "awake"


async def test_invalid_level_is_refused_before_anything_changes(core):
    with pytest.raises(InvalidRequestError):
        await core.sleep(3)
    assert core.sleep_state == "awake"


def test_the_sleep_level_of_replicas_merges_to_the_lowest():
    asleep, awake = MetricsRecorder(), MetricsRecorder()
    asleep.set("sleep_level", 2, model="m")
    awake.set("sleep_level", 0, model="m")
    assert merge([asleep.snapshot(), awake.snapshot()]).get("sleep_level", model="m") == 0
    other = MetricsRecorder()
    other.set("sleep_level", 1, model="m")
    assert merge([asleep.snapshot(), other.snapshot()]).get("sleep_level", model="m") == 1
