"""Prefix sharing through the real server: GRPO traffic sent one sample per request, groups interleaved, gets
each sample its own reward while the metrics show the shared prompts computed once; the caches stay within their
budgets under a stream of distinct prompts."""

from __future__ import annotations

import asyncio
import random

import pytest
from metrics_scrape import delta, scrape
from serve_harness import async_client, demo_config, running_app

from rmserve.model import load_reward_model

pytestmark = pytest.mark.ray

# fp32: sums over cached keys are reassociated, so a demo reward of about 5 moves by up to 1.1e-5 on an AMD EPYC
# (2e-6 of it): 1e-5 absolute, or relative for rewards above 1.
TOL = 1e-5
# 512 bytes a token on the demo model (fp32). The engine holds recent forwards in a quarter of it: room for the GRPO
# test's 8 interleaved first samples (about 280 KB) even when each goes in its own batch (a loaded machine), so each
# prompt is computed once; the budget test's stream of distinct prompts (about 2.7 MB) must still evict.
CACHE_BYTES = 2_000_000
REWARD_ITEMS = 24
TOPICS = ("owls", "tea", "rockets", "bridges", "poetry", "bees", "rivers", "cats")


@pytest.fixture(scope="module")
def app(demo_model_dir):
    config = demo_config(
        demo_model_dir,
        model={"prefix_cache_bytes": CACHE_BYTES, "reward_cache_items": REWARD_ITEMS},
        batching={"batch_wait_timeout_s": 0.002},
    )
    with running_app(config, ray_cpus=4) as live:
        yield live


@pytest.fixture(scope="module")
def reference(app):
    """The same model scoring every item whole, with no sharing and no caches."""
    return load_reward_model(app.config.model_spec(), prefix_sharing="off", reward_cache_items=0)


def grpo_requests(seed: int) -> list[dict]:
    """8 groups of 8 samples sharing a long prompt, one sample per request, groups interleaved."""
    rng = random.Random(seed)
    prompts = [f"Tell me about {topic}. " + " ".join(rng.choice(TOPICS) for _ in range(40)) for topic in TOPICS]
    groups = [
        [
            {"prompt": p, "response": f"Gladly! {rng.choice(TOPICS).title()} are lovely, {k} times over."}
            for k in range(8)
        ]
        for p in prompts
    ]
    return [{"items": [group[k]]} for k in range(8) for group in groups]


async def score_per_sample(client, requests: list[dict], reference, prefix: str = "") -> tuple[int, float, float]:
    """Send one-sample requests all at once, check every reward against ``reference`` and that every received token
    was either computed or saved; returns (tokens received, computed, saved)."""
    before = await scrape(client, prefix)
    responses = await asyncio.gather(*(client.post(f"{prefix}/v1/score", json=body) for body in requests))
    after = await scrape(client, prefix)
    got = []
    for response in responses:
        assert response.status_code == 200, response.text
        got += response.json()["rewards"]
    assert got == pytest.approx(reference.score([body["items"][0] for body in requests]), abs=TOL, rel=TOL)
    usage = sum(r.json()["usage"]["input_tokens"] for r in responses)
    saved = delta(before, after, "prefix_tokens_saved_total")
    computed = delta(before, after, "forward_real_tokens_total")
    assert computed + saved == usage
    return usage, computed, saved


async def test_grpo_per_sample_requests_get_their_own_rewards_and_share_prompts(app, reference):
    async with async_client(app) as client:
        before = await scrape(client)
        usage, computed, saved = await score_per_sample(client, grpo_requests(seed=1), reference)
        after = await scrape(client)
    print(f"64 GRPO samples: {usage} tokens received, {computed:.0f} computed, {saved:.0f} saved")
    # Each group's ~100-token prompt is computed about once, not eight times.
    assert saved > usage / 2
    assert delta(before, after, "prefix_cache_hits_total") >= 48


async def test_caches_stay_within_their_budgets_under_distinct_prompts(app, reference):
    rng = random.Random(2)
    items = [
        {"prompt": f"Question {k}: " + " ".join(rng.choice(TOPICS) for _ in range(30)), "response": "Of course."}
        for k in range(150)
    ]
    async with async_client(app) as client:
        for start in range(0, len(items), 6):
            chunk = items[start : start + 6]
            response = await client.post("/v1/score", json={"items": chunk})
            assert response.status_code == 200, response.text
            assert response.json()["rewards"] == pytest.approx(reference.score(chunk), abs=TOL, rel=TOL)
            scraped = await scrape(client)
            assert 0 < scraped("prefix_cache_bytes") <= CACHE_BYTES
            assert scraped("reward_cache_items") <= REWARD_ITEMS
        again = await client.post("/v1/score", json={"items": items[-6:]})  # the most recent: all cached
        assert again.json()["rewards"] == pytest.approx(reference.score(items[-6:]), abs=TOL, rel=TOL)
        final = await scrape(client)
    assert delta(scraped, final, "reward_cache_hits_total") == 6
