"""POST /v1/steps and vLLM's POST /pooling through the in-process server (the step rewards and /pooling on Ray Serve
too): step rewards equal the offline model's, aggregates equal their formulas, the errors are the documented ones, the
kinds answer only their own routes, and 64 concurrent one-sample requests of GRPO-shaped PRM traffic each get their own
step rewards."""

from __future__ import annotations

import asyncio
import math
import random

import pytest
from prm_checkpoints import save_format_checkpoint
from serve_harness import RUNTIMES, async_client, running_app

from rmserve.client import AsyncRewardClient, RewardClient
from rmserve.model import load_reward_model
from rmserve.serve.config.loading import load_config

TOL = 1e-5
PROMPT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many?"
STEPS = ["Natalia sold 48 / 2 = 24 clips in May.", "Altogether she sold 48 + 24 = 72 clips.", "The answer is 72."]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {
        "prm": save_format_checkpoint(tmp_path_factory.mktemp("prm"), "qwen2_prm")[0],
        "rm": save_format_checkpoint(tmp_path_factory.mktemp("rm"), "qwen2_rm")[0],
    }


@pytest.fixture(scope="module")
def config(checkpoints):
    return load_config(
        base={
            "model": {"dtype": "fp32", "device": "cpu", "forward_overhead_tokens": 0},
            "models": [
                {"name": "prm", "path": str(checkpoints["prm"]), "max_length": 256, "num_cpus": 0.5},
                {"name": "rm", "path": str(checkpoints["rm"]), "num_cpus": 0.5},
            ],
            "gateway_num_cpus": 0.25,
            "batching": {"batch_wait_timeout_s": 0.005},
        }
    )


@pytest.fixture(scope="module")
def app(config):
    with running_app(config, "inprocess") as live:
        yield live


@pytest.fixture(scope="module", params=RUNTIMES)
def each_runtime(config, request):
    """The module's in-process ``app`` (not started twice), and the same models on Ray Serve (one Ray instance)."""
    if request.param == "inprocess":
        yield request.getfixturevalue("app")
        return
    with running_app(config, "ray") as live:
        yield live


@pytest.fixture(scope="module")
def offline(checkpoints):
    """The PRM in the test process, every item whole (no sharing, no caches): the reference."""
    return load_reward_model(
        str(checkpoints["prm"]), dtype="fp32", device="cpu", prefix_sharing="off", reward_cache_items=0, max_length=256
    )


def offline_steps(offline, items: list[dict]) -> list[list[float]]:
    return offline.engine.score_batch([offline.tokenize(item, i).input_ids for i, item in enumerate(items)])


async def test_steps_rewards_and_aggregates(each_runtime, offline):
    app = each_runtime
    items = [{"prompt": PROMPT, "steps": STEPS}, {"prompt": [{"role": "user", "content": PROMPT}], "steps": ["72"]}]
    want = offline_steps(offline, items)
    async with async_client(app) as client:
        bodies = {}
        for how in ("min", "prod", "last", "mean", None):
            body = {"model": "prm", "items": items} | ({"aggregate": how} if how else {})
            response = await client.post("/v1/steps", json=body)
            assert response.status_code == 200, response.text
            bodies[how] = response.json()
    formulas = {"min": min, "prod": math.prod, "last": lambda r: r[-1], "mean": lambda r: sum(r) / len(r)}
    for how, body in bodies.items():
        assert set(body) == {"model", "results", "usage", "batch_invariant"} and body["model"] == "prm"
        for result, ref in zip(body["results"], want, strict=True):
            assert result["step_rewards"] == pytest.approx(ref, abs=TOL) and result["steps_truncated"] == 0
            assert result["reward"] == pytest.approx(formulas[how or "min"](result["step_rewards"]), abs=1e-12)
        assert body["usage"]["input_tokens"] > 0


async def test_truncation_reports_cut_steps_as_null(app, offline):
    long_prompt = PROMPT + " " + " ".join(["Count the clips carefully."] * 40)  # > max_length 256 with the steps
    steps = [f"Step {k}: " + "add the clips once more and write the total down. " * 3 for k in range(6)]
    item = {"prompt": long_prompt, "steps": steps}
    tokenized = offline.tokenize(item)
    assert tokenized.truncated and 0 < len(tokenized.input_ids.readouts) < len(steps)
    async with async_client(app) as client:
        response = await client.post("/v1/steps", json={"model": "prm", "items": [item], "aggregate": "mean"})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    cut = len(steps) - len(tokenized.input_ids.readouts)
    assert result["steps_truncated"] == cut and result["step_rewards"][:cut] == [None] * cut
    kept = result["step_rewards"][cut:]
    assert kept == pytest.approx(offline.engine.score_batch([tokenized.input_ids])[0], abs=TOL)
    assert result["reward"] == pytest.approx(sum(kept) / len(kept), abs=1e-12)


async def test_documented_errors(app):
    async with async_client(app) as client:
        hidden = await client.post(
            "/v1/steps", json={"model": "prm", "items": [{"prompt": PROMPT, "steps": ["ok", "a <extra_0> b"]}]}
        )
        outcome_on_prm = await client.post("/v1/score", json={"model": "prm", "items": [{"text": "2+2=4"}]})
        steps_on_rm = await client.post(
            "/v1/steps", json={"model": "rm", "items": [{"prompt": PROMPT, "steps": STEPS}]}
        )
        pooling_on_rm = await client.post("/pooling", json={"model": "rm", "input": "2+2=4"})
        classify_on_prm = await client.post("/classify", json={"model": "prm", "input": "2+2=4"})
        bad_aggregate = await client.post(
            "/v1/steps", json={"model": "prm", "items": [{"prompt": PROMPT, "steps": STEPS}], "aggregate": "max"}
        )
        no_steps = await client.post("/v1/steps", json={"model": "prm", "items": [{"prompt": PROMPT, "steps": []}]})
    assert hidden.status_code == 422 and hidden.json()["error"]["param"] == "items[0].steps[1]"
    for response, words in (
        (outcome_on_prm, "process reward model"),
        (classify_on_prm, "process reward model"),
        (steps_on_rm, "outcome reward model"),
        (pooling_on_rm, "outcome reward model"),
    ):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert words in error["message"] and error["param"] == "model" and "'" in error["message"]
    assert bad_aggregate.status_code == 422 and bad_aggregate.json()["error"]["param"] == "aggregate"
    assert no_steps.status_code == 422 and no_steps.json()["error"]["param"].startswith("items[0].steps")


async def test_pooling_answers_vllms_step_shape(each_runtime, offline):
    app = each_runtime
    item = {"prompt": PROMPT, "steps": STEPS}
    ids = offline.tokenize(item).input_ids
    text = offline.tokenizer.decode(list(ids))  # separators already in the text, as vLLM's clients send it
    want = offline.engine.score_batch([offline.tokenize({"text": text}).input_ids])[0]
    async with async_client(app) as client:
        single = await client.post("/pooling", json={"model": "prm", "input": text})
        listed = await client.post("/pooling", json={"model": "prm", "input": [text, text]})
    assert single.status_code == 200, single.text
    body = single.json()
    assert body["object"] == "list" and body["id"].startswith("pool-") and body["model"] == "prm"
    (entry,) = body["data"]
    assert entry["index"] == 0 and entry["object"] == "pooling" and len(entry["data"]) == len(STEPS)
    assert [p[1] for p in entry["data"]] == pytest.approx(want, abs=TOL)  # Qwen2.5-Math-PRM: [P(bad), P(good)]
    assert all(abs(sum(p) - 1) < 1e-6 for p in entry["data"])
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert [d["index"] for d in listed.json()["data"]] == [0, 1]


async def test_64_concurrent_grpo_requests_each_get_their_own_step_rewards(app, offline):
    rng = random.Random(19)
    words = ["add", "halve", "twice", "clips", "May", "April", "sum", "check", "total", "friends"]
    prompts = [f"Problem {g}: " + " ".join(rng.choice(words) for _ in range(30)) for g in range(8)]
    groups = [
        [
            {"prompt": p, "steps": [" ".join(rng.choice(words) for _ in range(6)) for _ in range(rng.randint(4, 12))]}
            for _ in range(8)
        ]
        for p in prompts
    ]
    items = [group[k] for k in range(8) for group in groups]  # one sample per request, groups interleaved
    want = offline_steps(offline, items)
    async with async_client(app) as client:
        responses = await asyncio.gather(
            *(client.post("/v1/steps", json={"model": "prm", "items": [item]}) for item in items)
        )
    for response, item, ref in zip(responses, items, want, strict=True):
        assert response.status_code == 200, response.text
        (result,) = response.json()["results"]
        cut = result["steps_truncated"]  # a long sample may lose its first steps to max_length (256)
        assert len(result["step_rewards"]) == len(item["steps"]) == cut + len(ref)
        assert result["step_rewards"][cut:] == pytest.approx(ref, abs=TOL)
    engine = app.inprocess.cores[0].model.engine  # the PRM's: the groups' prompts were computed once
    assert engine.stats.tokens_saved > 0


def test_sdk_steps_sync_and_async(app, offline):
    want = offline_steps(offline, [{"prompt": PROMPT, "steps": STEPS}])[0]
    with RewardClient(app.url) as client:
        (result,) = client.steps([PROMPT], [STEPS], aggregate="last", model="prm")
    assert result.step_rewards == pytest.approx(want, abs=TOL) and result.reward == pytest.approx(want[-1])
    assert result.steps_truncated == 0

    async def run():
        async with AsyncRewardClient(app.url) as client:
            return await client.steps([PROMPT], [STEPS], model="prm")

    (again,) = asyncio.run(run())
    assert again.step_rewards == pytest.approx(want, abs=TOL) and again.reward == pytest.approx(min(want))


async def test_hostile_bodies_get_a_4xx_with_the_error_body(app):
    huge = "clips " * 200_000  # far over max_length: truncated, its separators cut but the last
    bodies = [
        ("/v1/steps", {"model": "prm", "items": []}),
        ("/v1/steps", {"model": "prm", "items": [{"prompt": PROMPT, "steps": [1, 2]}]}),
        ("/v1/steps", {"model": "prm", "items": [{"prompt": PROMPT, "steps": ["ok"], "response": "x"}]}),
        ("/v1/steps", {"model": "prm", "items": [{"prompt": [], "steps": ["ok"]}]}),
        ("/v1/steps", {"model": "prm", "items": [{"prompt": PROMPT, "steps": [""]}]}),
        ("/v1/steps", {"model": "prm", "items": [{"text": "2+2=4<extra_0>"}]}),
        ("/v1/steps", {"model": "nope", "items": [{"prompt": PROMPT, "steps": ["ok"]}]}),
        ("/pooling", {"model": "prm", "input": "no separator in this text"}),
        ("/pooling", {"model": "prm", "input": [[10**12]]}),
        ("/pooling", {"model": "prm", "input": 5}),
    ]
    async with async_client(app) as client:
        answers = [await client.post(path, json=body) for path, body in bodies]
        long_one = await client.post("/v1/steps", json={"model": "prm", "items": [{"prompt": huge, "steps": ["a"]}]})
    for (path, body), response in zip(bodies, answers, strict=True):
        assert 400 <= response.status_code < 500, (path, body, response.text)
        assert set(response.json()["error"]) == {"message", "type", "code", "param"}
    assert long_one.status_code == 200 and long_one.json()["results"][0]["steps_truncated"] == 0
