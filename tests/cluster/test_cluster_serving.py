"""Issue 13, rmserve on a real multi-node Ray cluster: a head (Serve's controller and proxy, the Gateway) and two
worker nodes (one Scorer replica each), separate ``ray start`` processes on loopback, the app deployed from
deploy/serve_config.yaml. Rewards equal the offline ones, the replicas sit where the placement resources say, and
``/metrics`` totals stay exact across the two Scorer replicas on two nodes."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from cluster_harness import (
    APP_NAME,
    head_and_two_workers,
    replicas,
    running_replica_nodes,
)
from metrics_scrape import check_totals, replica_numbers, scrape

from rmserve.serve.rayserve.metrics_hub import HUB_DEPLOYMENT

pytestmark = [pytest.mark.ray, pytest.mark.cluster]

TOL = 1e-5  # fp32 on both sides


class Ledger:
    """What this module sent and got back: what /metrics must count."""

    def __init__(self) -> None:
        self.requests = 0
        self.items = 0
        self.input_tokens = 0

    def add(self, body: dict) -> None:
        self.requests += 1
        self.items += len(body["rewards"])
        self.input_tokens += body["usage"]["input_tokens"]


@pytest.fixture(scope="module")
def cluster(demo_model_dir):
    with head_and_two_workers(demo_model_dir, replicas=2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def ledger(cluster) -> Ledger:
    return Ledger()


def test_rewards_over_http_equal_offline_and_replicas_sit_where_placed(cluster, ledger, item_pool, offline_rewards):
    head, worker_1, worker_2 = cluster.nodes
    for items, expected in ((item_pool, offline_rewards), (item_pool[:3], offline_rewards[:3])):
        response = httpx.post(f"{cluster.url}/v1/score", json={"items": items}, timeout=60)
        assert response.status_code == 200, response.text
        ledger.add(response.json())
        assert response.json()["rewards"] == pytest.approx(expected, abs=TOL)
    assert running_replica_nodes("Scorer") == sorted([worker_1.node_id, worker_2.node_id])
    for deployment in ("Gateway", HUB_DEPLOYMENT):  # the metrics collector stays with the Gateway (gateway_resources)
        assert [(r["state"], r["node_id"]) for r in replicas(deployment)] == [("RUNNING", head.node_id)], deployment


async def test_metrics_totals_are_exact_with_two_scorer_replicas_on_two_nodes(
    cluster, ledger, item_pool, offline_rewards
):
    """Concurrent single- and multi-item requests; one scrape counts each exactly once, and the two replicas (on two
    nodes) each did part of the work, so the totals really are sums across nodes."""
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=60, limits=limits) as client:

        async def send(k: int) -> None:
            indices = [(k * 5 + j) % len(item_pool) for j in range(1 + k % 4)]
            response = await client.post("/v1/score", json={"items": [item_pool[i] for i in indices]})
            assert response.status_code == 200, response.text
            assert response.json()["rewards"] == pytest.approx([offline_rewards[i] for i in indices], abs=TOL)
            ledger.add(response.json())

        await asyncio.gather(*(send(k) for k in range(120)))
        scraped = await scrape(client)
    # Besides the scoring requests, the app answered the harness's /ready polls (how many is the harness's business).
    probes = {
        (labels["route"], labels["status"]): n
        for labels, n in ((dict(key), n) for key, n in scraped.series("requests_total").items())
        if labels["route"] == "/ready"
    }
    requests = {("/v1/score", "200"): ledger.requests, **probes}
    check_totals(scraped, items=ledger.items, input_tokens=ledger.input_tokens, requests=requests)
    assert (scraped("scorer_replicas"), scraped("gateway_replicas")) == (2, 1)
    per_replica = await replica_numbers(APP_NAME, "scorer")
    assert len(per_replica) == 2 and sum(per_replica.values()) == ledger.items
    assert all(v > 0 for v in per_replica.values()), per_replica
