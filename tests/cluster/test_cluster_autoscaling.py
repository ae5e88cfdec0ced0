"""Issue 13, autoscaling under load on a multi-node cluster: the Scorer with ``min_replicas: 1, max_replicas: 2``
(rmserve's ``autoscaling`` settings of deploy/serve_config.yaml, through ``RMSERVE_AUTOSCALING__*``). A load
step of many concurrent SDK clients scales it to 2 replicas (the second on the other worker node); when the step
ends, a single client keeps scoring while it scales back to 1. Every request succeeds with its correct reward during
both transitions. The times to scale are printed, not asserted.

What scales it: each Scorer replica reports the items it holds and ``autoscaling.QueuedItemsPolicy`` asks for
held items ÷ ``target_queued_items`` replicas. Serve's own count of ongoing requests would count merged Scorer calls
(the Gateway merges the requests that reach it together, serve/rayserve/coalescing.py), far fewer than the HTTP
requests in flight; the test prints the largest such count it saw, for comparison."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import pytest
from cluster_harness import (
    APP_NAME,
    head_and_two_workers,
    replicas,
    running_replica_nodes,
    wait_for,
)

from rmserve.client import AsyncRewardClient

pytestmark = [pytest.mark.ray, pytest.mark.cluster, pytest.mark.cluster_slow]

TOL = 1e-5
STEP_CLIENTS = 32  # the load step: concurrent clients, one request each in flight
# Items per request of the step: enough that the Scorer, not the Gateway's HTTP handling, is the bottleneck of this
# 2-core machine (with one or two items per request a Scorer replica held ~1 item on average: one is enough then).
STEP_ITEMS = 16
SCALE_TIMEOUT_S = 240
AFTER_DOWNSCALE = 10  # trickle responses after the second replica is gone
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_queued_items": 8,  # the step's clients hold up to 512 items: 2 replicas (the most); the trickle's 1-2: 1
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2,
    "upscale_delay_s": 1,
    "downscale_delay_s": 5,
}


@pytest.fixture(scope="module")
def cluster(demo_model_dir):
    settings = {f"RMSERVE_AUTOSCALING__{key.upper()}": str(value) for key, value in AUTOSCALING.items()}
    with head_and_two_workers(demo_model_dir, env=settings) as cluster:
        yield cluster


def ongoing_scorer_calls() -> float:
    """What Serve's autoscaler sees for the Scorer now: ongoing (merged) calls over all replicas."""
    import ray
    from ray.serve._private.common import DeploymentID
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    deployment = DeploymentID(name="Scorer", app_name=APP_NAME)
    return ray.get(controller._get_total_num_requests_for_deployment_for_testing.remote(deployment))


async def test_a_load_step_scales_the_scorer_up_and_back_down_without_a_failed_request(
    cluster, item_pool, offline_rewards
):
    assert len(running_replica_nodes("Scorer")) == 1
    attempts: Counter[str] = Counter()

    async def count_request(request: httpx.Request) -> None:
        attempts["sent"] += 1

    async def count_response(response: httpx.Response) -> None:
        attempts[str(response.status_code)] += 1

    answered: list[tuple[list[int], list[float]]] = []
    step_over, stop = asyncio.Event(), asyncio.Event()
    http = httpx.AsyncClient(
        event_hooks={"request": [count_request], "response": [count_response]},
        limits=httpx.Limits(max_connections=STEP_CLIENTS + 8),
    )
    client = AsyncRewardClient(cluster.url, http_client=http, timeout=60)

    async def score_until(k: int, done: asyncio.Event) -> int:
        sent = 0
        while not done.is_set():
            size = STEP_ITEMS if k >= 0 else 1 + sent % 2  # the trickle (k = -1) sends one or two items
            indices = [(k * 7 + sent * 3 + j) % len(item_pool) for j in range(size)]
            answered.append((indices, await client.score_items([item_pool[i] for i in indices])))
            sent += 1
        return sent

    peak_calls = 0.0
    second_replica_at: float | None = None  # when Serve decided to scale up (the replica exists, starting)

    def scaled_to(n: int) -> bool:
        nonlocal peak_calls, second_replica_at
        peak_calls = max(peak_calls, ongoing_scorer_calls())
        if second_replica_at is None and len(replicas("Scorer")) == 2:
            second_replica_at = time.monotonic()
        return len(running_replica_nodes("Scorer")) == n and len(replicas("Scorer")) == n

    async with http:
        trickle = asyncio.create_task(score_until(-1, stop))
        step = [asyncio.create_task(score_until(k, step_over)) for k in range(STEP_CLIENTS)]
        tasks = [trickle, *step]
        try:
            started = time.monotonic()
            await asyncio.to_thread(wait_for, lambda: scaled_to(2), SCALE_TIMEOUT_S, "2 Scorer replicas", 0.5)
            up_s = time.monotonic() - started
            nodes_at_peak = running_replica_nodes("Scorer")
            step_over.set()  # the step ends: its clients send nothing more
            stopped = time.monotonic()
            await asyncio.gather(*step)
            answered_at_step_end = len(answered)
            await asyncio.to_thread(wait_for, lambda: scaled_to(1), SCALE_TIMEOUT_S, "1 Scorer replica", 0.5)
            down_s = time.monotonic() - stopped
            await asyncio.to_thread(
                wait_for, lambda: len(answered) >= answered_at_step_end + AFTER_DOWNSCALE, 60, "trickle responses"
            )
        finally:
            step_over.set()
            stop.set()
            sent = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [s for s in sent if isinstance(s, BaseException)]
    assert not failures, f"requests failed: {failures!r}; attempts: {dict(attempts)}"
    print(
        f"\nautoscaling: a second replica started {second_replica_at - started:.1f} s and was RUNNING {up_s:.1f} s "
        f"after the {STEP_CLIENTS}-client step began; back to 1 "
        f"{down_s:.1f} s after it ended (downscale_delay_s {AUTOSCALING['downscale_delay_s']}); most ongoing Scorer "
        f"calls Serve saw: {peak_calls:g}; {len(answered)} requests answered; attempts: {dict(attempts)}"
    )
    head, worker_1, worker_2 = cluster.nodes
    assert nodes_at_peak == sorted([worker_1.node_id, worker_2.node_id])
    assert len(answered) == sum(sent)  # none lost
    for indices, rewards in answered:  # none wrong
        assert rewards == pytest.approx([offline_rewards[i] for i in indices], abs=TOL)
    # No attempt failed either (a retry would hide one): every request sent got a 200 at the first try.
    assert attempts == Counter({"sent": len(answered), "200": len(answered)})
