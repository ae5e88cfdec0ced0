"""Issue 7.3 — replica failure: a Scorer replica's actor is killed in the middle of a load run; Ray Serve starts a
new one; with the SDK's retries no item is lost and every reward is correct. While it happens, a probe sends one
request every 50 ms and polls /ready: every failed answer must be a retryable 503 (never a non-retryable status),
and the time to recovery (first success of a request sent after the kill, /ready back to 200) is reported.

The application has ONE Scorer replica, so the kill leaves no replica at all until Serve's replacement has loaded
the model: the hardest case for the clients.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from reliability_harness import TOL, app_config, deployed, distinct_items, offline_model, offline_scores

from rmserve.client import AsyncRewardClient

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

LOAD_ITEMS = 1_500
RECOVERY_LIMIT_S = 120.0


@pytest.fixture(scope="module")
def app(serve_instance, demo_model_dir):
    config = app_config(demo_model_dir, "rel-replica", batching={"batch_wait_timeout_s": 0.005})
    with deployed(serve_instance, config, prefix="/replica") as live:
        yield live


def scorer_actors(app_name: str) -> list[str]:
    import ray

    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and f"{app_name}#Scorer" in a["name"]
    )


async def probe(app, stop: asyncio.Event, log: list[tuple[float, float, str, int]]) -> None:
    """One single-item score and one /ready every 50 ms: (send time, answer time, what, status)."""
    body = {"items": [{"prompt": "Tell me about tea.", "response": "Tea has a long history."}]}
    async with app.client(timeout=90.0) as client:
        while not stop.is_set():
            for what, call in (("score", client.post("/v1/score", json=body)), ("ready", client.get("/ready"))):
                sent = time.monotonic()
                try:
                    status = (await call).status_code
                except Exception:  # a transport error counts as a failure of its own kind
                    status = -1
                log.append((sent, time.monotonic(), what, status))
            await asyncio.sleep(0.05)


async def test_killing_the_scorer_replica_mid_load_loses_no_item(app, figures):
    import ray

    items = distinct_items(LOAD_ITEMS, seed=33, forms=("pair",))  # one request holds one item form
    expected = offline_scores(offline_model(app.config.model_spec()), items)
    before = scorer_actors(app.name)
    assert len(before) == 1, before
    victim = ray.get_actor(before[0], namespace="serve")
    old_pid = (await app.stats())["pid"]

    statuses_before = await score_statuses(app)
    stop, log = asyncio.Event(), []
    prober = asyncio.ensure_future(probe(app, stop, log))
    async with AsyncRewardClient(app.url, max_retries=30, timeout=90.0, max_items_per_request=8) as client:
        load = asyncio.ensure_future(client.score_items(items))
        await asyncio.sleep(1.0)  # the load is under way
        assert not load.done(), "the load finished before the kill; make it larger"
        killed_at = time.monotonic()
        ray.kill(victim, no_restart=False)
        rewards = await asyncio.wait_for(load, timeout=300)
    # Keep probing until the new replica answers and /ready is back.
    deadline = time.monotonic() + RECOVERY_LIMIT_S
    while time.monotonic() < deadline:
        after_kill = [(w, s) for sent, _, w, s in log if sent > killed_at]
        if ("ready", 200) in after_kill and ("score", 200) in after_kill:
            break
        await asyncio.sleep(0.2)
    stop.set()
    await prober

    # Zero items lost, every reward correct, in input order.
    assert len(rewards) == len(items)
    mismatched = [i for i, (r, e) in enumerate(zip(rewards, expected, strict=True)) if abs(r - e) > TOL]
    assert not mismatched, mismatched[:10]

    # Serve replaced the replica.
    after = scorer_actors(app.name)
    assert len(after) == 1 and after != before, (before, after)
    assert (await app.stats())["pid"] != old_pid

    # Recovery: the first success among the probes sent after the kill, timed when its answer came.
    after_kill = [(done - killed_at, w, s) for sent, done, w, s in log if sent > killed_at]
    failures = Counter((w, s) for _, w, s in after_kill if s != 200)
    first_score = min(t for t, w, s in after_kill if w == "score" and s == 200)
    first_ready = min(t for t, w, s in after_kill if w == "ready" and s == 200)
    # What every client (the SDK's load and the probe) got from /v1/score, from the Gateway's own counters.
    seen = {s: n - statuses_before.get(s, 0) for s, n in (await score_statuses(app)).items()}
    seen = {s: n for s, n in seen.items() if n}
    figures.record(
        "replica failure",
        items=len(items),
        lost=len(items) - len(rewards),
        mismatched=len(mismatched),
        probe_failures_after_kill={f"{w} {s}": n for (w, s), n in sorted(failures.items())},
        score_statuses_during_run=seen,
        first_success_after_kill_s=round(first_score, 2),
        ready_again_after_kill_s=round(first_ready, 2),
    )
    # Whatever failed while no replica was up failed with a retryable 503 (not_ready), never a 4xx or a 500.
    assert set(s for (_, s) in failures) <= {503}, failures
    assert set(seen) <= {"200", "503"}, seen


async def score_statuses(app) -> dict[str, float]:
    """``rmserve_requests_total{route="/v1/score"}`` by status, from GET /metrics."""
    out: dict[str, float] = {}
    async with app.client() as client:
        text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("rmserve_requests_total{") and 'route="/v1/score"' in line:
            status = line.split('status="')[1].split('"')[0]
            out[status] = out.get(status, 0.0) + float(line.split()[-1])
    return out
