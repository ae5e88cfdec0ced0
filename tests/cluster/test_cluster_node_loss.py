"""Issue 13, node loss: the worker node that holds the only Scorer replica is killed (its whole process group, as when
a machine disappears) while SDK clients keep scoring; Serve starts the replica on the other worker node, and every
request gets its correct reward (none lost, none wrong) through the SDK's retries."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import pytest
from cluster_harness import (
    head_and_two_workers,
    running_replica_nodes,
    wait_for,
)

from rmserve.client import AsyncRewardClient

# Its own three-node cluster plus a node kill take about a minute: `make test-all` (test_cluster_serving covers the
# multi-node path in `make test`).
pytestmark = [pytest.mark.ray, pytest.mark.cluster, pytest.mark.cluster_slow]

TOL = 1e-5
CLIENTS = 8
BEFORE_KILL = 40  # responses before the node is killed (load is flowing)
AFTER_RECOVERY = 40  # responses after the replica runs again on the other node
RECOVERY_TIMEOUT_S = 240
# Backoff doubles from 0.5 s up to 8 s: 12 retries wait about 70 s in all, longer than the replica takes to come
# back on a loaded 2-core machine (node declared dead, new replica process, model loaded).
MAX_RETRIES = 12


@pytest.fixture(scope="module")
def cluster(demo_model_dir):
    with head_and_two_workers(demo_model_dir, replicas=1) as cluster:
        yield cluster


async def test_killing_the_scorers_node_mid_load_loses_no_reward(cluster, item_pool, offline_rewards):
    (victim_id,) = running_replica_nodes("Scorer")
    victim = next(n for n in cluster.nodes if n.node_id == victim_id)
    survivor = next(n for n in cluster.nodes[1:] if n is not victim)
    statuses: Counter[str] = Counter()  # every attempt the SDK made ("sent"), retries included, and its answer

    async def count_request(request: httpx.Request) -> None:
        statuses["sent"] += 1

    async def count_response(response: httpx.Response) -> None:
        statuses[str(response.status_code)] += 1

    answered: list[tuple[list[int], list[float], str]] = []  # (item indices, rewards, phase when sent)
    phase = "before"
    enough_before, enough_after, stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
    after_recovery = 0
    http = httpx.AsyncClient(
        event_hooks={"request": [count_request], "response": [count_response]}, limits=httpx.Limits(max_connections=64)
    )
    client = AsyncRewardClient(cluster.url, http_client=http, max_retries=MAX_RETRIES, timeout=60)

    async def score_forever(k: int) -> int:
        nonlocal after_recovery
        sent = 0
        while not stop.is_set():
            indices = [(k * 3 + sent * 5 + j) % len(item_pool) for j in range(1 + (k + sent) % 3)]
            sent_in = phase
            rewards = await client.score_items([item_pool[i] for i in indices])
            answered.append((indices, rewards, sent_in))
            sent += 1
            if len(answered) >= BEFORE_KILL:
                enough_before.set()
            if sent_in == "recovered":
                after_recovery += 1
                if after_recovery >= AFTER_RECOVERY:
                    enough_after.set()
        return sent

    async with http:
        workers = [asyncio.create_task(score_forever(k)) for k in range(CLIENTS)]
        try:
            await asyncio.wait_for(enough_before.wait(), 120)
            killed_at = time.monotonic()
            await asyncio.to_thread(cluster.kill, victim)
            phase = "outage"
            await asyncio.to_thread(
                wait_for,
                lambda: running_replica_nodes("Scorer") == [survivor.node_id],
                RECOVERY_TIMEOUT_S,
                f"the Scorer replica to run on {survivor.name}",
                1.0,
            )
            recovered_in = time.monotonic() - killed_at
            phase = "recovered"
            await asyncio.wait_for(enough_after.wait(), 120)
        finally:
            stop.set()
            sent = await asyncio.gather(*workers, return_exceptions=True)
    failures = [s for s in sent if isinstance(s, BaseException)]
    assert not failures, f"requests failed: {failures!r}; attempts by status: {dict(statuses)}"
    by_phase = Counter(p for _, _, p in answered)
    print(
        f"\nnode loss: {victim.name} killed after {by_phase['before']} responses; replica RUNNING on "
        f"{survivor.name} {recovered_in:.1f} s later; {by_phase['outage']} requests sent during the outage answered; "
        f"attempts by status: {dict(statuses)}"
    )
    assert len(answered) == sum(sent)  # none lost
    for indices, rewards, _ in answered:  # none wrong
        assert rewards == pytest.approx([offline_rewards[i] for i in indices], abs=TOL)
    assert by_phase["outage"] > 0 and by_phase["recovered"] >= AFTER_RECOVERY
    retried = {s for s in statuses if s not in ("sent", "200")}
    assert all(s == "429" or s.startswith("5") for s in retried), f"a non-retryable answer: {dict(statuses)}"
