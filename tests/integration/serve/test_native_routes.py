"""Every native route against a real server on loopback, in both runtimes (Ray Serve and in-process): reward parity
with ``RewardModel.score``, cross-request batching under 256 concurrent requests, and the Ray-handle path."""

from __future__ import annotations

import asyncio
import math
import os

import pytest
from serve_harness import RUNTIMES, LiveApp, async_client, demo_config, running_app

from rmserve.model.demo import heldout_pairs
from rmserve.model.errors import InvalidRequestError
from rmserve.model.synthetic import make_preference_pairs, make_rankings

pytestmark = pytest.mark.ray

TOL = 1e-5  # fp32 on CPU: batched vs. offline forward
MEAN, STD = 0.5, 2.0
LONG_TEXT = " ".join(["Tell me about rivers and mountains."] * 40)  # far over max_length=64


@pytest.fixture(scope="module", params=RUNTIMES)
def app(demo_model_dir, request):
    config = demo_config(
        demo_model_dir,
        model={"max_length": 64, "reward_mean": MEAN, "reward_std": STD},
        batching={"batch_wait_timeout_s": 0.01},
    )
    with running_app(config, request.param) as live:
        yield live


async def test_operational_routes(app: LiveApp, offline):
    async with async_client(app) as client:
        health, ready, models = await asyncio.gather(
            client.get("/health"), client.get("/ready"), client.get("/v1/models")
        )
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert (ready.status_code, ready.json()) == (200, {"status": "ready", "model": offline.model_id})
    assert models.status_code == 200
    names = [offline.model_id, app.config.model.path, os.path.realpath(app.config.model.path)]
    assert models.json() == {"data": [{**offline.info(), "names": list(dict.fromkeys(names))}]}
    card = models.json()["data"][0]
    assert (card["dtype"], card["max_length"], card["normalization"]) == ("fp32", 64, {"mean": MEAN, "std": STD})


CHAT_PROMPT = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tea?"}]
OWL_CHAT = [
    {"role": "user", "content": "Why are owls interesting?"},
    {"role": "assistant", "content": "Owls are loved by many people."},
]
SCORE_REQUESTS = {
    "pair": [
        {"prompt": "Tell me about cats.", "response": "Gladly! Cats are fascinating to study."},
        {"prompt": "Tell me about cats.", "response": "Go away."},
        {"prompt": "Tell me about cats.", "response": ""},  # a rollout that ended at once is scored, not refused
        {"prompt": CHAT_PROMPT, "response": "Sure."},
        {"prompt": LONG_TEXT, "response": "Of course. Rivers change with the seasons."},
    ],
    "conversation": [
        {"messages": OWL_CHAT},
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Why are owls"}, {"type": "text", "text": "interesting?"}],
                },
                OWL_CHAT[1],
            ]
        },  # OpenAI's text parts: joined by a newline
    ],
    "text": [{"text": "Tell me about bread. Of course. Bread has a long history."}, {"text": LONG_TEXT}],
    "tokens": [{"input_ids": [1, 50, 60, 70, 2]}, {"input_ids": list(range(3, 200))}],
}


@pytest.mark.parametrize("form", sorted(SCORE_REQUESTS))
async def test_score_equals_offline_reward_model(app: LiveApp, offline, form):
    items = SCORE_REQUESTS[form]
    expected = offline.score(items)
    tokenized = [offline.tokenize(item, i) for i, item in enumerate(items)]
    async with async_client(app) as client:
        versioned, alias, normalized = await asyncio.gather(
            client.post("/v1/score", json={"items": items}),
            client.post("/score", json={"items": items}),
            client.post("/v1/score", json={"items": items, "normalize": True, "model": offline.model_id}),
        )
    assert versioned.status_code == 200, versioned.text
    body = versioned.json()
    assert set(body) == {"model", "rewards", "truncated", "usage", "batch_invariant"}
    assert body["model"] == offline.model_id
    assert body["batch_invariant"] is False
    assert body["rewards"] == pytest.approx(expected, abs=TOL)
    assert body["truncated"] == [i for i, t in enumerate(tokenized) if t.truncated]
    assert body["usage"] == {"input_tokens": sum(len(t) for t in tokenized)}
    assert alias.status_code == 200 and alias.json()["rewards"] == pytest.approx(expected, abs=TOL)
    assert {k: v for k, v in alias.json().items() if k != "rewards"} == {
        k: v for k, v in body.items() if k != "rewards"
    }
    assert normalized.status_code == 200
    assert normalized.json()["rewards"] == pytest.approx([(r - MEAN) / STD for r in expected], abs=TOL)


async def test_preference_matches_score_and_picks_heldout_winners(app: LiveApp, offline):
    pairs = heldout_pairs(200)
    body = {"pairs": [{"prompt": p["prompt"], "response_a": p["chosen"], "response_b": p["rejected"]} for p in pairs]}
    async with async_client(app) as client:
        raw, norm = await asyncio.gather(
            client.post("/v1/preference", json=body), client.post("/v1/preference", json={**body, "normalize": True})
        )
    assert raw.status_code == 200 and norm.status_code == 200, raw.text
    results = raw.json()["results"]
    assert raw.json()["model"] == offline.model_id and len(results) == len(pairs)
    chosen = offline.score([{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs])
    rejected = offline.score([{"prompt": p["prompt"], "response": p["rejected"]} for p in pairs])
    for result, normed, a, b in zip(results, norm.json()["results"], chosen, rejected, strict=True):
        assert result["reward_a"] == pytest.approx(a, abs=TOL) and result["reward_b"] == pytest.approx(b, abs=TOL)
        assert result["prob_a"] == pytest.approx(1 / (1 + math.exp(-(a - b))), abs=1e-6)
        assert result["preferred"] == ("a" if result["reward_a"] >= result["reward_b"] else "b")
        assert normed["reward_a"] == pytest.approx((a - MEAN) / STD, abs=TOL)
        assert normed["prob_a"] == pytest.approx(result["prob_a"], abs=1e-6)  # from raw rewards
    accuracy = sum(r["preferred"] == "a" for r in results) / len(results)
    assert accuracy >= 0.90, accuracy


async def test_rerank_matches_score(app: LiveApp, offline):
    records = make_rankings(12, seed=99)
    groups = [{"prompt": r["prompt"], "responses": r["responses"]} for r in records]
    groups.append({"prompt": "Tell me about kites.", "responses": ["Gladly! Kites are fun."] * 3})  # a tie
    async with async_client(app) as client:
        full, top1 = await asyncio.gather(
            client.post("/v1/rerank", json={"groups": groups}),
            client.post("/v1/rerank", json={"groups": groups, "top_k": 1, "normalize": True}),
        )
    assert full.status_code == 200 and top1.status_code == 200, full.text
    for group, result, best in zip(groups, full.json()["results"], top1.json()["results"], strict=True):
        rewards = offline.score([{"prompt": group["prompt"], "response": r} for r in group["responses"]])
        expected_order = sorted(range(len(rewards)), key=lambda i: -rewards[i])
        ranking = result["ranking"]
        assert [r["reward"] for r in ranking] == pytest.approx([rewards[i] for i in expected_order], abs=TOL)
        assert all(x["reward"] >= y["reward"] for x, y in zip(ranking, ranking[1:], strict=False))
        assert sorted(r["index"] for r in ranking) == list(range(len(rewards)))
        assert result["best_index"] == ranking[0]["index"]
        assert len(best["ranking"]) == 1 and best["best_index"] == result["best_index"]
        assert best["ranking"][0]["reward"] == pytest.approx((ranking[0]["reward"] - MEAN) / STD, abs=TOL)
    assert [r["index"] for r in full.json()["results"][-1]["ranking"]] == [0, 1, 2]  # equal rewards: input order
    good = sum(r["best_index"] == 0 for r in full.json()["results"][:-1])  # the demo task puts the best first
    assert good >= 10


def distinct_items(n: int) -> list[dict]:
    items, seen = [], set()
    for pair in make_preference_pairs(n, seed=2024):
        for response in (pair["chosen"], pair["rejected"]):
            key = (pair["prompt"], response)
            if key not in seen:
                seen.add(key)
                items.append({"prompt": pair["prompt"], "response": response})
    return items[:n]


async def test_256_concurrent_single_item_requests_get_their_own_rewards_in_shared_batches(app: LiveApp, offline):
    items = distinct_items(256)
    assert len(items) == 256
    expected = offline.score(items)
    assert len({round(r, 4) for r in expected}) > 200  # rewards differ, so a mix-up would show
    before = (await app.stats())["batching"]
    async with async_client(app) as client:
        responses = await asyncio.gather(*(client.post("/v1/score", json={"items": [item]}) for item in items))
    after = (await app.stats())["batching"]
    for response, reward in zip(responses, expected, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["rewards"] == pytest.approx([reward], abs=TOL)
    new_batches = after["batches"] - before["batches"]
    sizes = after["recent_batch_sizes"][-new_batches:]
    assert after["items"] - before["items"] == 256 and sum(sizes) == 256
    assert max(sizes) > 1, sizes  # items of different requests shared a forward pass
    assert new_batches < 256


async def test_ray_handle_scores_without_http(app: LiveApp, offline):
    items = [
        {"prompt": "What do you know about comets?", "response": "Happy to help. Comets are worth learning about."}
    ]
    items += [
        {"text": "Tell me about chess. Boring."},
        {"input_ids": [1, 9, 8, 7]},
    ]
    app.only_ray()
    handle = app.scorer()  # == serve.get_deployment_handle("Scorer", app_name="rmserve")
    rewards = await handle.score.remote(items)
    assert rewards == pytest.approx(offline.score(items), abs=TOL)
    normalized = await handle.score.remote(items, normalize=True)
    assert normalized == pytest.approx([(r - MEAN) / STD for r in offline.score(items)], abs=TOL)
    with pytest.raises(InvalidRequestError) as info:
        await handle.score.remote([{"text": "ok"}, {"prompt": "q", "response": "r", "extra": 1}])
    assert info.value.index == 1 and info.value.message.startswith("items[1]")


async def test_fault_hooks_are_off_by_default(app: LiveApp):
    app.only_ray()
    with pytest.raises(InvalidRequestError, match="fault injection is disabled"):
        await app.scorer().set_faults.remote(fail_on_length=3)


def test_ray_handle_sync_result(app: LiveApp, offline):
    app.only_ray()
    from ray import serve

    handle = serve.get_deployment_handle("Scorer", app_name="rmserve")
    items = [{"prompt": "Tell me about whales.", "response": "Of course. Whales are loved by many people."}]
    assert handle.score.remote(items).result() == pytest.approx(offline.score(items), abs=TOL)


async def test_reconfigure_changes_batching_limits_without_restart(app: LiveApp, offline):
    app.only_ray()
    handle = app.scorer()
    before = await handle.stats.remote()
    original = app.config.scorer_user_config()
    narrowed = {**original, "batching": {**original["batching"], "max_batch_items": 1}}
    await handle.reconfigure.remote(narrowed)
    try:
        stats = await handle.stats.remote()
        assert stats["pid"] == before["pid"]  # same replica process: no restart
        assert stats["limits"]["max_batch_items"] == 1
        items = distinct_items(40)
        async with async_client(app) as client:
            responses = await asyncio.gather(*(client.post("/v1/score", json={"items": [it]}) for it in items))
        assert [r.json()["rewards"][0] for r in responses] == pytest.approx(offline.score(items), abs=TOL)
        after = await handle.stats.remote()
        new = after["batching"]["batches"] - stats["batching"]["batches"]
        assert new == 40 and set(after["batching"]["recent_batch_sizes"][-new:]) == {1}
    finally:
        await handle.reconfigure.remote(original)
    assert (await handle.stats.remote())["limits"]["max_batch_items"] == original["batching"]["max_batch_items"]


async def test_concurrent_requests_share_handle_calls_and_keep_their_own_errors(app: LiveApp, offline):
    # The Gateway merges requests that reach it together into one Scorer call (serve/rayserve/coalescing.py). Among 96
    # concurrent requests, every fourth is invalid in its own way (an empty prompt+response text, an unknown
    # model); each must get its own 422 / 404 while the ones merged with it get their exact rewards.
    items = distinct_items(96)
    expected = offline.score(items)
    bad = {k: ({"items": [{"text": ""}]} if k % 8 == 3 else {"items": [items[k]], "model": "not-this-one"})
           for k in range(3, 96, 4)}  # fmt: skip
    before = (await app.stats()).get("gateway_calls")
    async with async_client(app) as client:
        responses = await asyncio.gather(
            *(client.post("/v1/score", json=bad.get(k, {"items": [items[k]]})) for k in range(len(items)))
        )
    after = (await app.stats()).get("gateway_calls")
    for k, (response, reward) in enumerate(zip(responses, expected, strict=True)):
        if k in bad:
            assert response.status_code == (422 if k % 8 == 3 else 404), (k, response.text)
            assert response.json()["error"]["type"] == "invalid_request"
        else:
            assert response.status_code == 200, response.text
            assert response.json()["rewards"] == pytest.approx([reward], abs=TOL)
    if app.runtime != "ray":
        return  # in one process each request reaches the core on its own: there is no Ray call to merge
    calls, carried = after["calls"] - before["calls"], after["requests"] - before["requests"]
    assert carried == 96 - len([k for k in bad if k % 8 != 3])  # unknown-model requests never reach the Scorer
    assert calls < carried, (calls, carried)  # requests really were merged
