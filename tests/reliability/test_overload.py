"""Issue 7.2 — overload: bursts of 10x the queue limit get 429 + Retry-After for the excess and never a 5xx; the
queue never holds more than its limit; the server processes' resident memory stays bounded (measured and reported);
once a burst has passed, the idle latency returns to its level before the bursts; with the SDK's retries every
item of a burst eventually gets its correct reward.

The Scorer's queue holds ``QUEUE`` items; the fault plan makes every request holding a burst item (a tokens item of
``BURST_LENGTH`` tokens) wait ``HOLD_S`` before it joins a batch, so admitted items occupy the queue long enough
for a burst to overflow it even on a fast machine.

Latency tolerance: on a shared 2-core machine a median over 20 sequential requests still moves with other
processes' load, so "back to idle" is ``p50_after <= 3 x p50_before + 50 ms``, and the test polls (20 s at most)
until one window of 20 requests meets it; the time that took is reported.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from reliability_harness import (
    TOL,
    ServerMemory,
    idle_latencies,
    ids_of_length,
    median,
    offline_model,
    offline_scores,
    rounded,
)

from rmserve.client import AsyncRewardClient

pytestmark = pytest.mark.ray

QUEUE = 32  # the faults app's limits.max_queued_items
BURST = 10 * QUEUE  # single-item requests per burst
BURSTS = 2  # in CI; the slow suite adds SLOW_BURSTS more
SLOW_BURSTS = 30
BURST_LENGTH, HOLD_S = 48, 1.0
RETRY_AFTER_S = 1
LATENCY_RATIO, LATENCY_SLACK_S, RECOVERY_WINDOW_S = 3.0, 0.05, 20.0
MEMORY_GROWTH_MIB = 300.0  # the most the server processes may grow during a burst
LEAK_MIB = 64.0  # the most they may keep growing after bursts (see the end of run_bursts)


@pytest.fixture(scope="module")
def app(faults_app):
    assert faults_app.config.limits.max_queued_items == QUEUE
    assert faults_app.config.limits.retry_after_s == RETRY_AFTER_S
    return faults_app


def burst_items(burst: int) -> list[dict]:
    return [{"input_ids": ids_of_length(BURST_LENGTH, 1000 * burst + k)} for k in range(BURST)]


async def watch_queue(app, stop: asyncio.Event, seen: list[int]) -> None:
    scorer = app.scorer()
    while not stop.is_set():
        seen.append((await scorer.stats.remote())["queued_items"])
        await asyncio.sleep(0.05)


async def wait_drained(app) -> None:
    for _ in range(200):
        if (await app.stats())["queued_items"] == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the queue did not drain after the burst")


async def back_to_idle(client, baseline_p50: float, seed: int) -> tuple[float, float]:
    """(p50 of the first window that meets the tolerance, seconds it took); fails after RECOVERY_WINDOW_S."""
    started = time.perf_counter()
    bound = LATENCY_RATIO * baseline_p50 + LATENCY_SLACK_S
    windows = []
    while True:
        p50 = median(await idle_latencies(client, 20, seed=seed + len(windows)))
        windows.append(p50)
        waited = time.perf_counter() - started
        if p50 <= bound:
            return p50, waited
        assert waited < RECOVERY_WINDOW_S, f"p50 stayed above {bound:.3f} s for {waited:.0f} s: {windows}"


@pytest.mark.timeout(900)
async def test_bursts_of_ten_times_the_queue_are_shed_with_429_and_memory_stays_bounded(app, figures):
    await run_bursts(app, figures, range(BURSTS), "overload (raw bursts)")


@pytest.mark.slow
@pytest.mark.timeout(3600)
async def test_thirty_more_bursts_retained_memory_levels_off(app, figures):
    await run_bursts(app, figures, range(100, 100 + SLOW_BURSTS), "overload (raw bursts, slow)")


async def run_bursts(app, figures, bursts: range, section: str) -> None:
    offline = offline_model(app.config.model_spec())
    memory = ServerMemory(app.name)
    async with app.client() as client:
        await idle_latencies(client, 10, seed=1)  # warm the path
        baseline = await idle_latencies(client, 30, seed=2)
        idle_memory = memory.sample()
        assert any("Scorer" in k for k in idle_memory) and any("Gateway" in k for k in idle_memory), idle_memory
        rejected_before = (await app.stats())["rejected_requests"]
        await app.set_faults(delays={BURST_LENGTH: HOLD_S})
        results, after_burst_memory, recoveries = [], [], []
        try:
            for burst in bursts:
                items = burst_items(burst)
                expected = offline_scores(offline, items)
                stop, queue_seen = asyncio.Event(), []
                watcher = asyncio.ensure_future(watch_queue(app, stop, queue_seen))
                with memory.watching():
                    started = time.perf_counter()
                    responses = await asyncio.gather(
                        *(client.post("/v1/score", json={"items": [item]}) for item in items)
                    )
                    duration = time.perf_counter() - started
                stop.set()
                await watcher
                await wait_drained(app)
                statuses = Counter(r.status_code for r in responses)
                results.append(
                    {"statuses": dict(statuses), "seconds": round(duration, 2), "max_queued": max(queue_seen)}
                )
                # Never a 5xx: 200 with the right reward, or 429 with Retry-After and the error body.
                assert set(statuses) <= {200, 429}, statuses
                for response, reward in zip(responses, expected, strict=True):
                    if response.status_code == 200:
                        assert response.json()["rewards"][0] == pytest.approx(reward, abs=TOL)
                    else:
                        assert response.headers["retry-after"] == str(RETRY_AFTER_S)
                        assert response.json()["error"]["type"] == "overloaded"
                # The queue bound held: at most QUEUE items at a time, each held >= HOLD_S, so a burst lasting
                # `duration` admits at most QUEUE x (duration / HOLD_S + 1) items; the rest were shed.
                assert max(queue_seen) <= QUEUE
                assert statuses[200] <= QUEUE * (duration / HOLD_S + 1)
                assert statuses[429] >= BURST // 4, statuses
                # The burst is over: idle latency comes back.
                await app.set_faults()
                p50, waited = await back_to_idle(client, median(baseline), seed=100 * burst)
                recoveries.append({"p50_s": round(p50, 4), "seconds_to_idle": round(waited, 1)})
                after_burst_memory.append(memory.sample())
                await app.set_faults(delays={BURST_LENGTH: HOLD_S})
        finally:
            await app.set_faults()
        rejected = (await app.stats())["rejected_requests"] - rejected_before
    peak = memory.peak
    figures.record(
        section,
        bursts_survived=len(results),
        burst_requests=BURST,
        queue_limit=QUEUE,
        bursts=results,
        rejected_requests=rejected,
        idle_p50_before_s=round(median(baseline), 4),
        after_bursts=recoveries,
        rss_mib_idle=rounded(idle_memory),
        rss_mib_peak=rounded(peak),
        rss_mib_after_each_burst={
            label.split("[")[0]: [round(m.get(label, 0.0), 1) for m in after_burst_memory]
            for label in after_burst_memory[0]
        },
    )
    assert rejected == sum(r["statuses"].get(429, 0) for r in results)
    assert peak["total"] - idle_memory["total"] <= MEMORY_GROWTH_MIB, (idle_memory, peak)
    # No leak: what the processes keep after a burst levels off (allocator high-water marks, Ray's own state).
    # Over 30 bursts here: +53, +16, +9 MiB per 10 bursts. Two bursts: the second adds little; more: the
    # second half of them adds at most half as much.
    totals = [m["total"] for m in after_burst_memory]
    if len(totals) < 4:
        assert totals[-1] - totals[0] <= LEAK_MIB, after_burst_memory
    else:
        assert totals[-1] - totals[len(totals) // 2] <= LEAK_MIB / 2, totals


@pytest.mark.timeout(600)
async def test_with_sdk_retries_every_item_of_a_burst_succeeds(app, figures):
    offline = offline_model(app.config.model_spec())
    items = burst_items(99)
    expected = offline_scores(offline, items)
    rejected_before = (await app.stats())["rejected_requests"]
    await app.set_faults(delays={BURST_LENGTH: HOLD_S})
    try:
        started = time.perf_counter()
        async with AsyncRewardClient(app.url, max_retries=100, timeout=60.0) as client:
            rewards = await asyncio.wait_for(
                asyncio.gather(*(client.score_items([item]) for item in items)), timeout=300
            )
        elapsed = time.perf_counter() - started
    finally:
        await app.set_faults()
    rejected = (await app.stats())["rejected_requests"] - rejected_before
    assert [r[0] for r in rewards] == pytest.approx(expected, abs=TOL)
    assert rejected > 0, "the burst never overflowed the queue, so the retries were not exercised"
    figures.record(
        "overload (SDK retries)",
        items=len(items),
        succeeded=len(rewards),
        rejections_retried=rejected,
        seconds=round(elapsed, 1),
    )
