"""Issue 7.4 — accelerator out of memory: through the fault plan (``oom_on_length``: a forward of 2+ rows whose
longest row has that many tokens raises ``torch.OutOfMemoryError``), the engine splits the micro-batch in half and
retries; every client gets its correct reward, and ``rmserve_oom_splits_total`` counts each split (as does the
Scorer's ``stats()["engine"]["oom_splits"]``).

A micro-batch of k rows that all run out of memory ends in k single rows after exactly k - 1 splits, so the splits
of a run equal (items in out-of-memory micro-batches) - (such micro-batches), which the test checks exactly.
"""

from __future__ import annotations

import asyncio

import pytest
from reliability_harness import TOL, ids_of_length, offline_model, offline_scores

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

OOM_LENGTH = 40


@pytest.fixture(scope="module")
def app(faults_app):
    return faults_app


async def oom_counters(app, client) -> tuple[dict, float]:
    engine = (await app.stats())["engine"]
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith("rmserve_oom_splits_total "):
            return engine, float(line.split()[1])
    raise AssertionError("rmserve_oom_splits_total is missing from GET /metrics")


async def test_one_request_split_down_to_single_rows(app, figures):
    items = [{"input_ids": ids_of_length(OOM_LENGTH, seed)} for seed in range(16)]
    expected = offline_scores(offline_model(app.config.model_spec()), items)
    async with app.client() as client:
        await app.set_faults(oom_on_length=OOM_LENGTH)
        try:
            engine_before, metric_before = await oom_counters(app, client)
            response = await client.post("/v1/score", json={"items": items})
            engine_after, metric_after = await oom_counters(app, client)
        finally:
            await app.set_faults()
    assert response.status_code == 200, response.text
    assert response.json()["rewards"] == pytest.approx(expected, abs=TOL)
    splits = engine_after["oom_splits"] - engine_before["oom_splits"]
    # Items another test of the session already scored come from the reward cache, without a forward; the others
    # were split down to forwards of one row each (a row whose prefix another test left in the prefix cache can
    # start in a micro-batch of its own, one split fewer).
    cached = engine_after["caches"]["reward_cache_hits"] - engine_before["caches"]["reward_cache_hits"]
    forwards = engine_after["microbatches"] - engine_before["microbatches"]
    assert forwards == len(items) - cached and splits >= (len(items) - cached) // 2, (forwards, cached, splits)
    assert engine_after["items"] - engine_before["items"] == len(items)  # each item ran exactly once, alone
    assert metric_after - metric_before == splits
    figures.record("accelerator OOM", single_request_items=len(items), single_request_splits=splits)


async def test_concurrent_requests_survive_out_of_memory_with_correct_rewards(app, figures):
    # Requests of OOM-length items (they fail while batched) mixed with requests of other lengths (they do not).
    # 30 items in all: fewer than the faults app's queue limit (32), so no request may be shed with a 429 even if
    # every one of them is queued at the same moment.
    requests = [
        [{"input_ids": ids_of_length(OOM_LENGTH, 100 + 10 * r + k)} for k in range(1 + r % 3)] for r in range(10)
    ]
    requests += [[{"input_ids": ids_of_length(OOM_LENGTH - 1 - r, 500 + r)}] for r in range(10)]
    assert sum(map(len, requests)) < app.config.limits.max_queued_items
    offline = offline_model(app.config.model_spec())
    async with app.client() as client:
        await app.set_faults(oom_on_length=OOM_LENGTH)
        try:
            engine_before, metric_before = await oom_counters(app, client)
            responses = await asyncio.gather(*(client.post("/v1/score", json={"items": r}) for r in requests))
            engine_after, metric_after = await oom_counters(app, client)
        finally:
            await app.set_faults()
    for response, items in zip(responses, requests, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["rewards"] == pytest.approx(offline_scores(offline, items), abs=TOL)
    splits = engine_after["oom_splits"] - engine_before["oom_splits"]
    assert metric_after - metric_before == splits
    assert engine_after["items"] - engine_before["items"] == sum(map(len, requests))
    figures.record("accelerator OOM", concurrent_requests=len(requests), concurrent_splits=splits)
