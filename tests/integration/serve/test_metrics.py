"""Issue 5, metrics, against a real Ray Serve app: ``GET /metrics`` totals across two Scorer and two Gateway
replicas read from one scrape, consistent with what ``/v1/score`` reported; promtool accepts the scrape. A second,
single-replica app with fault injection provokes out-of-memory splits and 429s (a fault set through the handle
reaches one replica only)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import pytest
from metrics_scrape import delta, replica_numbers, scrape
from serve_harness import APP_NAME, LiveApp, async_client, demo_config, running_app

from rmserve.serve import build_app

pytestmark = pytest.mark.ray

TOL = 1e-5
FAULTS_APP, FAULTS_PREFIX = "rmserve-faults", "/faults"
QUEUE = 8


@pytest.fixture(scope="module")
def app(demo_model_dir):
    config = demo_config(demo_model_dir, replicas=2, gateway_replicas=2, batching={"batch_wait_timeout_s": 0.01})
    with running_app(config, ray_cpus=4) as live:
        yield live


@pytest.fixture(scope="module")
def faults_app(app, demo_model_dir):
    from ray import serve

    config = demo_config(
        demo_model_dir,
        app_name=FAULTS_APP,
        testing={"fault_injection": True},
        limits={"max_queued_items": QUEUE, "max_items_per_request": QUEUE},
        batching={"batch_wait_timeout_s": 0.05},
    )
    serve.run(build_app(config), name=FAULTS_APP, route_prefix=FAULTS_PREFIX)
    yield serve.get_deployment_handle("Scorer", app_name=FAULTS_APP)
    serve.delete(FAULTS_APP)


@pytest.fixture
async def client(app):
    async with async_client(app) as c:
        yield c


def items_of(n: int, start: int) -> list[dict]:
    return [{"prompt": f"Question {start + k} about rivers?", "response": f"Answer {k} of several."} for k in range(n)]


async def test_one_scrape_totals_both_scorer_replicas(app: LiveApp, client, offline):
    sizes = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 1, 1, 1]
    requests = [items_of(n, 100 * k) for k, n in enumerate(sizes)]
    n_items = sum(sizes)
    before = await scrape(client)
    responses = await asyncio.gather(*(client.post("/v1/score", json={"items": items}) for items in requests))
    for response, items in zip(responses, requests, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["rewards"] == pytest.approx(offline.score(items), abs=TOL)
    usage_tokens = sum(r.json()["usage"]["input_tokens"] for r in responses)
    after = await scrape(client)
    assert delta(before, after, "items_scored_total") == n_items
    assert delta(before, after, "input_tokens_total") == usage_tokens
    assert delta(before, after, "truncated_items_total") == 0
    assert delta(before, after, "requests_total", route="/v1/score", status="200") == len(requests)
    assert delta(before, after, "request_duration_seconds_count", route="/v1/score") == len(requests)
    # Every item went through exactly one batch and one forward pass (no failures, no OOM here).
    assert delta(before, after, "batch_size_items_sum") == n_items
    batches = delta(before, after, "batch_size_items_count")
    assert 1 <= batches <= n_items and delta(before, after, "batch_padded_tokens_count") == batches
    assert delta(before, after, "batch_padded_tokens_sum") == delta(before, after, "forward_padded_tokens_total")
    # Every token was either computed or saved (a shared prefix computed once, a cached prefix, a cached reward).
    computed = delta(before, after, "forward_real_tokens_total")
    assert computed + delta(before, after, "prefix_tokens_saved_total") == usage_tokens
    assert delta(before, after, "forward_padded_tokens_total") >= computed
    efficiency = after("forward_real_tokens_total") / after("forward_padded_tokens_total")
    assert after("padding_efficiency") == pytest.approx(efficiency, abs=1e-12)
    assert after("batch_size_items_bucket", le="+Inf") == after("batch_size_items_count")
    assert (after("scorer_replicas"), after("gateway_replicas")) == (2, 2)
    assert after("queue_depth") == 0
    assert after.series("model_info") == {(("dtype", "fp32"), ("model", offline.model_id), ("quantization", "none")): 1}
    # Both replicas did part of the work, so the totals above really are sums over replicas.
    per_replica = await replica_numbers(APP_NAME, "scorer")
    assert len(per_replica) == 2 and sum(per_replica.values()) >= n_items
    assert all(v > 0 for v in per_replica.values()), per_replica


@pytest.mark.skipif(
    shutil.which("promtool") is None and not os.environ.get("CI"),
    reason="promtool missing: apt-get install -y prometheus",
)
async def test_promtool_accepts_a_real_scrape(client):
    await client.post("/v1/score", json={"items": items_of(3, 0)})
    await client.get("/no/such/route")
    text = (await scrape(client)).text
    result = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


async def test_requests_are_labelled_by_route_template_and_status(client):
    before = await scrape(client)
    assert (await client.get("/no/such/route")).status_code == 404
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/v1/score")).status_code == 405
    after = await scrape(client)
    for route, status in (("other", "404"), ("/health", "200"), ("/v1/score", "405")):
        assert delta(before, after, "requests_total", route=route, status=status) == 1, (route, status)
    # The scrape before is counted once it has been answered, so the scrape after sees it.
    assert delta(before, after, "requests_total", route="/metrics", status="200") == 1


def ids(length: int, start: int = 10) -> list[int]:
    return [(start + k) % 600 + 5 for k in range(length)]


async def test_oom_splits_are_counted(faults_app, client, demo_model):
    length = 37
    items = [{"input_ids": ids(length, start)} for start in (1, 50, 100, 150)]
    await faults_app.set_faults.remote(oom_on_length=length)
    try:
        before = await scrape(client, FAULTS_PREFIX)
        response = await client.post(f"{FAULTS_PREFIX}/v1/score", json={"items": items})
        after = await scrape(client, FAULTS_PREFIX)
    finally:
        await faults_app.set_faults.remote()
    assert response.status_code == 200, response.text
    assert response.json()["rewards"] == pytest.approx(demo_model.score(items), abs=TOL)  # split, then scored
    splits = delta(before, after, "oom_splits_total")
    assert 1 <= splits <= len(items) - 1  # a batch of k rows that all fail splits k - 1 times at most
    assert delta(before, after, "items_scored_total") == len(items)


async def test_rejected_requests_are_counted(faults_app, client):
    length = 41
    await faults_app.set_faults.remote(delays={length: 2.0})
    try:
        before = await scrape(client, FAULTS_PREFIX)
        holder = asyncio.ensure_future(
            client.post(
                f"{FAULTS_PREFIX}/v1/score", json={"items": [{"input_ids": ids(length, k)} for k in range(QUEUE)]}
            )
        )
        await asyncio.sleep(0.8)  # the holder's items now fill the replica's queue for ~2 s
        during = await scrape(client, FAULTS_PREFIX)
        rejected = await asyncio.gather(
            *(client.post(f"{FAULTS_PREFIX}/v1/score", json={"items": [{"text": f"extra {k}"}]}) for k in range(3))
        )
        assert (await holder).status_code == 200
        after = await scrape(client, FAULTS_PREFIX)
    finally:
        await faults_app.set_faults.remote()
    assert during("queue_depth") == QUEUE
    assert [r.status_code for r in rejected] == [429] * 3
    assert delta(before, after, "rejected_requests_total") == 3
    assert delta(before, after, "requests_total", route="/v1/score", status="429") == 3
    assert after("queue_depth") == 0
