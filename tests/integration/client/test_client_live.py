"""Issue 4 acceptance: both SDK clients against the real Ray Serve app on loopback.

Every method returns the same numbers as the raw HTTP routes; a 5,000-item ``score`` call goes through
chunking and comes back in input order; the README's client snippets run as written.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import httpx
import pytest

from rmserve.client import AsyncRewardClient, InvalidRequestError, RewardClient
from rmserve.model.synthetic import make_preference_pairs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from serve_harness import demo_config, running_app  # noqa: E402

pytestmark = pytest.mark.ray
TOL = 1e-5
README = Path(__file__).resolve().parents[3] / "README.md"


@pytest.fixture(scope="module")
def app(demo_model_dir):
    config = demo_config(demo_model_dir, batching={"batch_wait_timeout_s": 0.005})
    with running_app(config) as live:
        yield live


@pytest.fixture(scope="module")
def offline(app):
    from rmserve.model import load_reward_model

    return load_reward_model(app.config.model_spec())


PAIRS = make_preference_pairs(12, seed=21)
PROMPTS = [p["prompt"] for p in PAIRS]
CHOSEN = [p["chosen"] for p in PAIRS]
REJECTED = [p["rejected"] for p in PAIRS]


def _raw(app, path: str, body: dict) -> dict:
    response = httpx.post(app.url + path, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_sync_client_matches_raw_routes(app):
    raw_score = _raw(app, "/v1/score", {"items": [{"prompt": p, "response": r} for p, r in zip(PROMPTS, CHOSEN)]})
    raw_pref = _raw(
        app,
        "/v1/preference",
        {"pairs": [{"prompt": p, "response_a": a, "response_b": b} for p, a, b in zip(PROMPTS, CHOSEN, REJECTED)]},
    )
    groups = [[c, r, "No comment."] for c, r in zip(CHOSEN, REJECTED)]
    raw_rerank = _raw(app, "/v1/rerank", {"groups": [{"prompt": p, "responses": g} for p, g in zip(PROMPTS, groups)]})
    with RewardClient(app.url, max_items_per_request=5) as client:  # small chunks: several requests per call
        assert client.health() and client.ready()
        assert client.models()[0].id == raw_score["model"]
        assert client.score(PROMPTS, CHOSEN) == pytest.approx(raw_score["rewards"], abs=TOL)
        items = [{"prompt": p, "response": r} for p, r in zip(PROMPTS, CHOSEN)]
        assert client.score_items(items) == pytest.approx(raw_score["rewards"], abs=TOL)
        prefs = client.preference(PROMPTS, CHOSEN, REJECTED)
        for got, want in zip(prefs, raw_pref["results"], strict=True):
            assert got.reward_a == pytest.approx(want["reward_a"], abs=TOL)
            assert got.prob_a == pytest.approx(want["prob_a"], abs=TOL)
            assert got.preferred == want["preferred"]
        ranked = client.rerank(PROMPTS, groups, top_k=2)
        for got, want in zip(ranked, raw_rerank["results"], strict=True):
            assert got.best_index == want["best_index"]
            assert [r.index for r in got.ranking] == [r["index"] for r in want["ranking"]][:2]
        empty = _raw(app, "/v1/score", {"items": [{"prompt": "Hi", "response": ""}]})["rewards"]
        assert client.score(["Hi", "Hi"], ["Hello", ""])[1] == pytest.approx(empty[0], abs=TOL)  # scored, not refused
        with pytest.raises(InvalidRequestError) as info:
            client.score_items([{"text": "Hi"}, {"text": ""}])
        assert info.value.status_code == 422 and info.value.param == "items[1].text"


async def test_async_client_matches_raw_routes(app):
    raw = _raw(app, "/v1/score", {"items": [{"prompt": p, "response": r} for p, r in zip(PROMPTS, REJECTED)]})
    async with AsyncRewardClient(app.url, max_items_per_request=4, max_concurrency=3) as client:
        assert await client.health() and await client.ready()
        assert await client.score(PROMPTS, REJECTED) == pytest.approx(raw["rewards"], abs=TOL)
        prefs = await client.preference(PROMPTS, CHOSEN, REJECTED)
        assert [p.preferred for p in prefs] == ["a" if x.reward_a >= x.reward_b else "b" for x in prefs]
        best = await client.rerank(PROMPTS[:3], [[r, c] for c, r in zip(CHOSEN[:3], REJECTED[:3])])
        assert [b.best_index for b in best] == [1, 1, 1]  # the demo model prefers the chosen answers


def test_five_thousand_items_come_back_in_order(app, offline):
    pairs = make_preference_pairs(2500, seed=33)
    prompts = [p["prompt"] for p in pairs for _ in (0, 1)]
    responses = [r for p in pairs for r in (p["chosen"], p["rejected"])]
    with RewardClient(app.url, max_items_per_request=256, max_concurrency=8) as client:
        rewards = client.score(prompts, responses)
    assert len(rewards) == 5000
    sample = range(0, 5000, 37)
    want = offline.score([{"prompt": prompts[i], "response": responses[i]} for i in sample])
    assert [rewards[i] for i in sample] == pytest.approx(want, abs=TOL)


def test_async_five_thousand_items_in_order(app, offline):
    texts = [f"Tell me about item {i}. Of course. Item {i} has a long history." for i in range(5000)]

    async def run():
        async with AsyncRewardClient(app.url, max_items_per_request=300, max_concurrency=6) as client:
            return await client.score_items([{"text": t} for t in texts])

    rewards = asyncio.run(run())
    sample = range(3, 5000, 41)
    assert [rewards[i] for i in sample] == pytest.approx(offline.score([{"text": texts[i]} for i in sample]), abs=TOL)


def _readme_client_snippets() -> dict[str, str]:
    section = README.read_text().split("## Python client", 1)[1].split("\n## ", 1)[0]
    titles = re.findall(r"^### (.+)$", section, flags=re.M)
    codes = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    return dict(zip(titles, codes, strict=True))


@pytest.mark.parametrize("title", ["PPO loop", "GRPO with asyncio"])
def test_readme_snippets_run_against_the_server(app, title):
    code = _readme_client_snippets()[title]
    exec(compile(code, f"README:{title}", "exec"), {"RMSERVE_URL": app.url, "__name__": "readme_snippet"})
