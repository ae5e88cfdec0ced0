"""Issue 20 over HTTP (in-process runtime): a model served with ``model.batch_invariant`` says so in ``/v1/models``, in
every scoring response and in the SDK's result, and an item's reward is the same float whether it came alone or in
a request with other items, in bf16, through the whole server (queue, batching, prefix cache)."""

from __future__ import annotations

import asyncio
import random

import pytest
from serve_harness import async_client, demo_config, running_app

from rmserve.client import AsyncRewardClient
from rmserve.model.synthetic import make_preference_pairs


@pytest.fixture(scope="module")
def app(demo_model_dir):
    # bf16: where the default mode's rewards move with the batch; no reward cache, so a repeat is computed again
    model = {"dtype": "bf16", "batch_invariant": True, "reward_cache_items": 0}
    config = demo_config(demo_model_dir, model=model, batching={"batch_wait_timeout_s": 0.01})
    with running_app(config, "inprocess") as live:
        yield live


async def test_the_mode_is_reported_where_a_client_can_check_it(app):
    async with async_client(app) as client:
        card = (await client.get("/v1/models")).json()["data"][0]
        score = (await client.post("/v1/score", json={"items": [{"text": "Tea is nice."}]})).json()
        group = {"prompt": "Tea?", "responses": ["Yes.", "No."]}
        rerank = (await client.post("/v1/rerank", json={"groups": [group]})).json()
        pair = {"prompt": "Tea?", "response_a": "Yes.", "response_b": "No."}
        preference = (await client.post("/v1/preference", json={"pairs": [pair]})).json()
    assert card["batch_invariant"] is True
    assert score["batch_invariant"] is rerank["batch_invariant"] is preference["batch_invariant"] is True
    async with AsyncRewardClient(app.url) as sdk:
        assert (await sdk.score_detailed([{"text": "Tea is nice."}])).batch_invariant is True


async def test_an_items_reward_is_the_same_float_alone_and_in_any_request(app):
    pairs = make_preference_pairs(16, seed=3)[:16]
    items = [{"prompt": p["prompt"], "response": p[side]} for p in pairs for side in ("chosen", "rejected")]
    async with async_client(app) as client:
        alone = []
        for item in items:  # one at a time: nothing else in the batch
            alone.append((await client.post("/v1/score", json={"items": [item]})).json()["rewards"][0])
        rng = random.Random(7)
        for _ in range(3):  # the same items again, in shuffled requests of random sizes sent at once
            order = rng.sample(range(len(items)), len(items))
            cuts = sorted(rng.sample(range(1, len(items)), 4))
            chunks = [order[a:b] for a, b in zip([0, *cuts], [*cuts, len(items)], strict=True)]
            answers = await asyncio.gather(
                *(client.post("/v1/score", json={"items": [items[i] for i in chunk]}) for chunk in chunks)
            )
            for chunk, answer in zip(chunks, answers, strict=True):
                for i, reward in zip(chunk, answer.json()["rewards"], strict=True):
                    assert reward == alone[i], (i, reward, alone[i])
