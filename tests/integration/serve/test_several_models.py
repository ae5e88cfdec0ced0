"""Issue 12 acceptance against a real Ray Serve app: two different tiny checkpoints served at once (one Scorer
deployment each), routing on ``model``, ensembles equal to the offline formula for every ``combine`` mode, 128
concurrent requests mixed across models and an ensemble, the Python SDK's ensemble fields and per-call model, reward
telemetry equal to values computed offline, promtool on a real scrape, and the Grafana dashboard's queries against that
scrape."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from metrics_scrape import scrape
from serve_harness import APP_NAME, LiveApp, async_client, running_app

from rmserve.client import AsyncRewardClient
from rmserve.model import load_reward_model
from rmserve.serve.config.loading import load_config
from rmserve.serve.metrics.store import REWARDS, SPREADS

pytestmark = pytest.mark.ray

TOL = 1e-5  # fp32 on CPU: batched vs. offline forward
STATS = {"helpful": {"mean": 0.5, "std": 2.0}, "safe": {"mean": -0.25, "std": 0.5}}
WEIGHTS = {"helpful": 1.0, "safe": 3.0}
ENSEMBLES = {
    "avg": {"members": WEIGHTS, "combine": "mean"},
    "worst": {"members": WEIGHTS, "combine": "min"},
    "cautious": {"members": WEIGHTS, "combine": "mean_minus_std", "lambda": 0.5},
    "probe": {"members": {"helpful": 1.0, "safe": 1.0}, "combine": "mean"},  # scored by the telemetry test only
}
DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana_dashboard.json"


def items_of(n: int, start: int = 0) -> list[dict]:
    """Pair items of varied lengths."""
    return [
        {"prompt": f"Question {start + k} about rivers{' and lakes' * (k % 5)}?", "response": "Yes. " * (1 + k % 7)}
        for k in range(n)
    ]


@pytest.fixture(scope="module")
def checkpoints(checkpoint_factory) -> dict[str, Path]:
    helpful, _, _ = checkpoint_factory("score", **STATS["helpful"])
    safe, _, _ = checkpoint_factory("score", seed=1, **STATS["safe"])
    return {"helpful": helpful, "safe": safe}


@pytest.fixture(scope="module")
def offline(checkpoints):
    return {name: load_reward_model(str(path), dtype="fp32", device="cpu") for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def app(checkpoints):
    config = load_config(
        base={
            "model": {"dtype": "fp32", "device": "cpu"},
            "models": [
                {"name": "helpful", "path": str(checkpoints["helpful"]), "num_cpus": 0.5},
                {"name": "safe", "path": str(checkpoints["safe"]), "num_cpus": 0.5, "served_model_names": ["safety"]},
            ],
            "ensembles": [{"name": name, **spec} for name, spec in ENSEMBLES.items()],
            "gateway_num_cpus": 0.25,
            "batching": {"batch_wait_timeout_s": 0.01},
        }
    )
    with running_app(config, ray_cpus=4) as live:
        yield live


@pytest.fixture
async def client(app: LiveApp):
    async with async_client(app) as c:
        yield c


def normalized(offline, name: str, items: list[dict]) -> np.ndarray:
    return (np.array(offline[name].score(items)) - STATS[name]["mean"]) / STATS[name]["std"]


def expected_ensemble(offline, ensemble: str, items: list[dict]) -> tuple[np.ndarray, np.ndarray, dict]:
    """The README's formula, written out with numpy from each member's offline rewards."""
    spec = ENSEMBLES[ensemble]
    names = list(spec["members"])
    z = np.stack([normalized(offline, m, items) for m in names], axis=1)
    w = np.array([spec["members"][m] for m in names])
    mu = (z * w).sum(axis=1) / w.sum()
    sigma = np.sqrt((w * (z - mu[:, None]) ** 2).sum(axis=1) / w.sum())
    combine = spec["combine"]
    reward = {"mean": mu, "min": z.min(axis=1), "mean_minus_std": mu - spec.get("lambda", 1.0) * sigma}[combine]
    return reward, sigma, {m: z[:, k] for k, m in enumerate(names)}


async def test_each_model_gets_exactly_its_own_offline_rewards(app, client, offline, checkpoints):
    items = items_of(12)
    expected = {name: offline[name].score(items) for name in offline}
    assert np.abs(np.array(expected["helpful"]) - np.array(expected["safe"])).max() > 1e-2  # two different models
    cases = [
        ("helpful", "helpful"),
        ("safe", "safe"),
        (None, "helpful"),  # absent: the first model
        ("safety", "safe"),  # a served_model_names entry
        (str(checkpoints["safe"]), "safe"),  # the path as given
        (str(checkpoints["safe"]) + "/", "safe"),
        (os.path.realpath(checkpoints["helpful"]), "helpful"),
    ]
    for requested, served in cases:
        body = {"items": items, **({"model": requested} if requested else {})}
        response = await client.post("/v1/score", json=body)
        assert response.status_code == 200, response.text
        data = response.json()
        assert data["model"] == served
        assert data["rewards"] == pytest.approx(expected[served], abs=TOL), requested
        assert set(data) == {"model", "rewards", "truncated", "usage", "batch_invariant"}  # no ensemble fields
    normalized_safe = await client.post("/v1/score", json={"items": items, "model": "safe", "normalize": True})
    assert normalized_safe.json()["rewards"] == pytest.approx(list(normalized(offline, "safe", items)), abs=TOL)


async def test_each_model_has_its_own_scorer_deployment(app, offline):
    from ray import serve

    items = items_of(3)
    helpful = await serve.get_deployment_handle("Scorer", app_name=APP_NAME).score.remote(items)
    safe = await serve.get_deployment_handle("Scorer-safe", app_name=APP_NAME).score.remote(items)
    assert helpful == pytest.approx(offline["helpful"].score(items), abs=TOL)
    assert safe == pytest.approx(offline["safe"].score(items), abs=TOL)


async def test_an_unknown_model_is_a_404_naming_the_model_field(client):
    routes = [
        ("/v1/score", {"items": items_of(1), "model": "nope"}),
        ("/v1/preference", {"pairs": [{"prompt": "p", "response_a": "a", "response_b": "b"}], "model": "nope"}),
        ("/v1/rerank", {"groups": [{"prompt": "p", "responses": ["a"]}], "model": "nope"}),
        ("/get_reward/nope", {"query": ["text"]}),
        ("/classify", {"input": ["text"], "model": "nope"}),
    ]
    for route, body in routes:
        response = await client.post(route, json=body)
        assert response.status_code == 404, (route, response.text)
        error = response.json()["error"]
        assert (error["param"], error["code"]) == ("model", 404), route
        assert "helpful" in error["message"] and "cautious" in error["message"]


async def test_models_lists_every_model_and_ensemble(client, offline, checkpoints):
    response = await client.get("/v1/models")
    assert response.status_code == 200, response.text
    cards = {card["id"]: card for card in response.json()["data"]}
    assert list(cards) == ["helpful", "safe", *ENSEMBLES]
    safe = cards["safe"]
    assert safe["names"][:2] == ["safe", "safety"] and str(checkpoints["safe"]) in safe["names"]
    assert safe["normalization"] == STATS["safe"] and safe["dtype"] == "fp32" and "ensemble" not in safe
    cautious = cards["cautious"]
    assert cautious["ensemble"] == {"members": WEIGHTS, "combine": "mean_minus_std", "lambda": 0.5}
    assert (cautious["names"], cautious["dtype"], cautious["head"]) == (["cautious"], "fp32", "ensemble")
    assert cautious["max_length"] == min(offline[m].info()["max_length"] for m in WEIGHTS)


@pytest.mark.parametrize("ensemble", ["avg", "worst", "cautious"])
async def test_ensemble_rewards_equal_the_offline_formula(client, offline, ensemble):
    items = items_of(10, start=50)
    reward, sigma, members = expected_ensemble(offline, ensemble, items)
    for normalize in (False, True):  # already normalised: the flag changes nothing
        response = await client.post("/v1/score", json={"items": items, "model": ensemble, "normalize": normalize})
        assert response.status_code == 200, response.text
        data = response.json()
        assert data["model"] == ensemble
        assert data["rewards"] == pytest.approx(list(reward), abs=TOL)
        assert data["spread"] == pytest.approx(list(sigma), abs=TOL)
        assert set(data["member_rewards"]) == set(WEIGHTS)
        for member, values in members.items():
            assert data["member_rewards"][member] == pytest.approx(list(values), abs=TOL)


async def test_preference_and_rerank_of_an_ensemble_report_members_and_spread(client, offline):
    items = items_of(4, start=7)
    pairs = [
        {"prompt": items[k]["prompt"], "response_a": items[k]["response"], "response_b": items[k + 1]["response"]}
        for k in (0, 2)
    ]
    pair_items = [{"prompt": p["prompt"], "response": r} for p in pairs for r in (p["response_a"], p["response_b"])]
    p_reward, p_sigma, p_members = expected_ensemble(offline, "cautious", pair_items)
    response = await client.post("/v1/preference", json={"pairs": pairs, "model": "cautious"})
    assert response.status_code == 200, response.text
    for n, result in enumerate(response.json()["results"]):
        a, b = 2 * n, 2 * n + 1
        assert (result["reward_a"], result["reward_b"]) == pytest.approx((p_reward[a], p_reward[b]), abs=TOL)
        assert (result["spread_a"], result["spread_b"]) == pytest.approx((p_sigma[a], p_sigma[b]), abs=TOL)
        assert result["member_rewards_a"] == pytest.approx({m: v[a] for m, v in p_members.items()}, abs=TOL)
        assert result["member_rewards_b"] == pytest.approx({m: v[b] for m, v in p_members.items()}, abs=TOL)
        assert result["prob_a"] == pytest.approx(1 / (1 + math.exp(p_reward[b] - p_reward[a])), abs=TOL)
    prompt = items[0]["prompt"]
    responses = [item["response"] for item in items]
    group_items = [{"prompt": prompt, "response": r} for r in responses]
    g_reward, g_sigma, g_members = expected_ensemble(offline, "cautious", group_items)
    body = {"groups": [{"prompt": prompt, "responses": responses}], "model": "cautious"}
    response = await client.post("/v1/rerank", json=body)
    (result,) = response.json()["results"]
    assert [r["index"] for r in result["ranking"]] == sorted(range(4), key=lambda i: -g_reward[i])
    assert result["spread"] == pytest.approx(list(g_sigma), abs=TOL)
    assert result["member_rewards"]["safe"] == pytest.approx(list(g_members["safe"]), abs=TOL)
    single = await client.post("/v1/preference", json={"pairs": pairs, "model": "helpful"})
    assert set(single.json()["results"][0]) == {"reward_a", "reward_b", "prob_a", "preferred"}


async def test_compatibility_routes_pick_by_model(client, offline):
    texts = [f"Question {k}? Answer: {'yes ' * k}" for k in range(1, 6)]
    text_items = [{"text": t} for t in texts]
    response = await client.post("/get_reward/safe", json={"query": texts})
    assert response.status_code == 200, response.text
    assert response.json()["rewards"] == pytest.approx(offline["safe"].score(text_items), abs=TOL)
    default = await client.post("/get_reward", json={"query": texts, "model": "safe"})  # a body's model is ignored
    assert default.json()["rewards"] == pytest.approx(offline["helpful"].score(text_items), abs=TOL)
    reward, _, _ = expected_ensemble(offline, "worst", text_items)
    response = await client.post("/classify", json={"model": "worst", "input": texts, "use_activation": False})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "worst"
    assert [d["probs"][0] for d in response.json()["data"]] == pytest.approx(list(reward), abs=TOL)
    response = await client.post("/get_reward/avg", json={"query": texts})
    assert response.json()["rewards"] == pytest.approx(list(expected_ensemble(offline, "avg", text_items)[0]), abs=TOL)


async def test_128_concurrent_requests_mixed_across_models_and_an_ensemble(client, offline):
    names = [None, "helpful", "safe", "avg"]
    requests = [(names[k % 4], items_of(1 + k % 3, start=1000 + 10 * k)) for k in range(128)]
    expected = []
    for model, items in requests:
        if model == "avg":
            expected.append(list(expected_ensemble(offline, "avg", items)[0]))
        else:
            expected.append(offline[model or "helpful"].score(items))
    responses = await asyncio.gather(
        *(client.post("/v1/score", json={"items": items, **({"model": m} if m else {})}) for m, items in requests)
    )
    for (model, _), response, want in zip(requests, responses, expected, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["model"] == (model or "helpful")
        assert response.json()["rewards"] == pytest.approx(want, abs=TOL), model


async def test_sdk_member_rewards_and_spread_equal_the_offline_formula(app, offline):
    items = items_of(11, start=500)
    reward, sigma, members = expected_ensemble(offline, "cautious", items)
    async with AsyncRewardClient(app.url, model="helpful", max_items_per_request=4, timeout=60.0) as sdk:
        result = await sdk.score_detailed(items, model="cautious")  # three requests: 4 + 4 + 3 items
        plain = await sdk.score_detailed(items)  # the client's own model
        pairs = await sdk.preference(
            [item["prompt"] for item in items[:5]],
            [item["response"] for item in items[:5]],
            [item["response"] for item in items[5:10]],
            model="cautious",
        )
        (group,) = await sdk.rerank([items[0]["prompt"]], [[item["response"] for item in items[:6]]], model="cautious")
    assert result.model == "cautious"
    assert result.rewards == pytest.approx(list(reward), abs=TOL)
    assert result.spread == pytest.approx(list(sigma), abs=TOL)
    assert set(result.member_rewards) == set(WEIGHTS)
    for member, values in members.items():
        assert result.member_rewards[member] == pytest.approx(list(values), abs=TOL), member
    assert (plain.model, plain.member_rewards, plain.spread) == ("helpful", None, None)
    assert plain.rewards == pytest.approx(offline["helpful"].score(items), abs=TOL)

    pair_items = [{"prompt": i["prompt"], "response": r["response"]} for i, r in zip(items[:5], items[5:10])]
    b_reward, b_sigma, b_members = expected_ensemble(offline, "cautious", pair_items)
    for k, pair in enumerate(pairs):  # response_a of pair k is items[k]; response_b is items[5 + k]'s response
        assert (pair.reward_a, pair.spread_a) == pytest.approx((reward[k], sigma[k]), abs=TOL)
        assert (pair.reward_b, pair.spread_b) == pytest.approx((b_reward[k], b_sigma[k]), abs=TOL)
        assert pair.member_rewards_a == pytest.approx({m: v[k] for m, v in members.items()}, abs=TOL)
        assert pair.member_rewards_b == pytest.approx({m: v[k] for m, v in b_members.items()}, abs=TOL)

    group_items = [{"prompt": items[0]["prompt"], "response": item["response"]} for item in items[:6]]
    g_reward, g_sigma, g_members = expected_ensemble(offline, "cautious", group_items)
    assert [r.index for r in group.ranking] == sorted(range(6), key=lambda i: -g_reward[i])
    assert group.spread == pytest.approx(list(g_sigma), abs=TOL)
    for member, values in g_members.items():
        assert group.member_rewards[member] == pytest.approx(list(values), abs=TOL), member


def bucket_labels(bounds: tuple[float, ...]) -> list[str]:
    return [repr(float(b)) for b in bounds] + ["+Inf"]


def cumulative(values: np.ndarray, bounds: tuple[float, ...]) -> list[int]:
    return [int((values <= b).sum()) for b in bounds] + [len(values)]


async def test_reward_telemetry_equals_values_computed_offline(client, offline):
    items = items_of(40, start=300)
    lengths = np.array([len(offline["helpful"].tokenize(item, i)) for i, item in enumerate(items)])
    assert len(set(lengths)) > 5
    before = await scrape(client)
    for start in range(0, 40, 8):  # five answers for the ensemble only this test scores ...
        response = await client.post("/v1/score", json={"items": items[start : start + 8], "model": "probe"})
        assert response.status_code == 200, response.text
    raw_safe = np.array(offline["safe"].score(items))
    response = await client.post("/v1/score", json={"items": items, "model": "safe"})  # ... and a plain model
    assert response.status_code == 200, response.text
    after = await scrape(client)

    reward, sigma, _ = expected_ensemble(offline, "probe", items)
    for le, count in zip(bucket_labels(REWARDS), cumulative(reward, REWARDS), strict=True):
        assert after("reward_bucket", le=le, model="probe") == count, le
    for le, count in zip(bucket_labels(SPREADS), cumulative(sigma, SPREADS), strict=True):
        assert after("ensemble_spread_bucket", le=le, model="probe") == count, le
    assert after("reward_count", model="probe") == 40
    assert after("reward_sum", model="probe") == pytest.approx(reward.sum(), abs=40 * TOL)
    assert after("reward_items_total", model="probe") == 40
    assert after("reward_truncated_items_total", model="probe") == 0
    assert after("reward_window_items", model="probe") == 40
    assert after("reward_rolling_mean", model="probe") == pytest.approx(reward.mean(), abs=TOL)
    assert after("reward_rolling_std", model="probe") == pytest.approx(reward.std(), abs=TOL)
    corr = np.corrcoef(reward, lengths)[0, 1]
    assert after("reward_length_correlation", model="probe") == pytest.approx(corr, abs=1e-4)

    # A served model that other tests scored too: what this test added equals the offline raw rewards.
    for le, count in zip(bucket_labels(REWARDS), cumulative(raw_safe, REWARDS), strict=True):
        assert after("reward_bucket", le=le, model="safe") - before("reward_bucket", le=le, model="safe") == count
    added = after("reward_sum", model="safe") - before("reward_sum", model="safe")
    assert added / 40 == pytest.approx(raw_safe.mean(), abs=TOL)
    # The serving metrics stay totals over every model's Scorer.
    assert after("items_scored_total") - before("items_scored_total") == 2 * 40 + 40
    assert after("scorer_replicas") == 2


@pytest.mark.skipif(
    shutil.which("promtool") is None and not os.environ.get("CI"),
    reason="promtool missing: apt-get install -y prometheus",
)
async def test_promtool_accepts_a_real_scrape_with_telemetry(client):
    await client.post("/v1/score", json={"items": items_of(3), "model": "cautious"})
    text = (await scrape(client)).text
    assert 'rmserve_reward_rolling_mean{model="cautious"}' in text
    result = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["definition"])
    return queries


async def test_every_metric_the_dashboard_queries_is_in_a_real_scrape(client):
    await client.post("/v1/score", json={"items": items_of(3), "model": "avg"})
    await client.post("/v1/score", json={"items": items_of(3), "model": "helpful"})
    names = {name for name, _ in (await scrape(client)).samples}
    queried = {name for query in dashboard_queries() for name in re.findall(r"\brmserve_[a-z0-9_]+", query)}
    assert len(queried) >= 20
    assert queried <= names, sorted(queried - names)
