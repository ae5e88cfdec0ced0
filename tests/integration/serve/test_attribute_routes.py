"""A multi-attribute model through the server, in both runtimes (Ray Serve and in-process): /v1/score returns every
attribute by name next to the weighted reward, /v1/models lists the weights, the SDK's score_detailed carries them,
normalisation works on the reward."""

from __future__ import annotations

import pytest
from prm_checkpoints import ATTRIBUTES, save_attribute_checkpoint
from serve_harness import RUNTIMES, async_client, running_app

from rmserve.client import RewardClient
from rmserve.model import load_reward_model
from rmserve.serve.config.loading import load_config

TOL = 1e-5
WEIGHTS = {"helpfulness": 1.0, "correctness": 2.0, "verbosity": -0.5}
ITEMS = [
    {"prompt": "Tell me about owls.", "response": "Owls hunt at night."},
    {"prompt": "Tea?", "response": "Brewed."},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_attribute_checkpoint(tmp_path_factory.mktemp("attributes"))


MODEL = {"dtype": "fp32", "device": "cpu", "attribute_weights": WEIGHTS, "reward_std": 2.0}


@pytest.fixture(scope="module", params=RUNTIMES)
def app(checkpoint, request):
    out, _ = checkpoint
    base = {"model": {**MODEL, "path": str(out), "forward_overhead_tokens": 0}, "num_cpus": 1, "gateway_num_cpus": 0.25}
    with running_app(load_config(base=base), request.param) as live:
        yield live


async def test_score_returns_every_attribute_and_the_weighted_reward(app, checkpoint):
    out, reference = checkpoint
    offline = load_reward_model(str(out), **MODEL)  # the item's ids, as the server tokenizes it
    async with async_client(app) as client:
        response = await client.post("/v1/score", json={"items": ITEMS})
        normalized = await client.post("/v1/score", json={"items": ITEMS, "normalize": True})
        models = await client.get("/v1/models")
    assert response.status_code == 200, response.text
    body = response.json()
    for reward, attributes, item in zip(body["rewards"], body["attributes"], ITEMS, strict=True):
        want = dict(zip(ATTRIBUTES, reference(offline.tokenize(item).input_ids), strict=True))
        assert attributes == pytest.approx(want, abs=TOL)
        assert reward == pytest.approx(sum(WEIGHTS[k] * v for k, v in want.items()), abs=TOL)
    assert normalized.json()["rewards"] == pytest.approx([r / 2.0 for r in body["rewards"]], abs=TOL)
    assert models.json()["data"][0]["attributes"] == WEIGHTS


def test_sdk_score_detailed_carries_the_attributes(app):
    with RewardClient(app.url) as client:
        result = client.score_detailed(ITEMS)
    assert result.attributes is not None and set(result.attributes[0]) == set(ATTRIBUTES)
    assert len(result.attributes) == len(result.rewards) == len(ITEMS)
