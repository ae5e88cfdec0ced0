"""Issue 18: the trainers' request shapes as rows of the endpoint table, over HTTP on the in-process runtime (the same
pipeline Ray Serve runs; ``test_trainer_clients.py`` replays the trainers' clients against Ray): SGLang's
``/v1/embeddings``, slime's ``/slime/reward``, the Cohere/Jina rerank shape on ``/rerank``, ``/v1/rerank`` and
``/v2/rerank``, and a served model's checkpoint directory (the demo's included) as its name."""

from __future__ import annotations

import math

import pytest
from serve_harness import LiveApp, async_client, demo_config, running_app

from rmserve.model.synthetic import make_preference_pairs

TOL = 1e-5  # fp32 on CPU


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    path, _, tokenizer = checkpoint_factory("score", "llama", "pad")
    return path, tokenizer


@pytest.fixture(scope="module")
def app(checkpoint):
    with running_app(demo_config(checkpoint[0], batching={"batch_wait_timeout_s": 0.01}), "inprocess") as live:
        yield live


@pytest.fixture
async def client(app):
    async with async_client(app) as c:
        yield c


@pytest.fixture(scope="module")
def pairs():
    return make_preference_pairs(6, seed=5)[:6]


def templated(tokenizer, prompt: str, response: str | None = None) -> str:
    chat = [{"role": "user", "content": prompt}]
    if response is None:
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    chat.append({"role": "assistant", "content": response})
    return tokenizer.apply_chat_template(chat, tokenize=False)


# -- SGLang's /v1/embeddings --------------------------------------------------------------------------------------
async def test_embeddings_answer_the_raw_reward_last_in_each_embedding(client, checkpoint, offline, pairs):
    texts = [templated(checkpoint[1], p["prompt"], p["chosen"]) for p in pairs]
    expected = offline.score([{"text": t} for t in texts])
    one = await client.post("/v1/embeddings", json={"model": str(checkpoint[0]), "input": texts[0]})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["object"] == "list" and body["data"][-1]["object"] == "embedding"
    assert body["data"][-1]["embedding"][-1] == pytest.approx(expected[0], abs=TOL)
    assert body["usage"]["prompt_tokens"] == len(offline.tokenize({"text": texts[0]}))
    many = (await client.post("/v1/embeddings", json={"input": texts, "encoding_format": "float"})).json()
    assert [d["index"] for d in many["data"]] == list(range(len(texts)))
    assert [d["embedding"][-1] for d in many["data"]] == pytest.approx(expected, abs=TOL)
    ids = list(offline.tokenize({"text": texts[1]}).input_ids)
    by_ids = (await client.post("/v1/embeddings", json={"input": ids})).json()
    assert by_ids["data"][0]["embedding"][-1] == pytest.approx(expected[1], abs=TOL)


async def test_embeddings_errors_are_400_naming_the_input_or_404_naming_the_model(client):
    bad = await client.post("/v1/embeddings", json={"input": ["fine", 3]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input[1]"
    unknown = await client.post("/v1/embeddings", json={"model": "/not/served", "input": "x"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    empty = await client.post("/v1/embeddings", json={"input": []})
    assert empty.status_code == 200 and empty.json()["data"] == []


# -- slime's remote reward model -----------------------------------------------------------------------------------
async def test_slime_sample_gets_the_reward_v1_score_gives_the_same_pair(client, checkpoint, offline, pairs):
    pair = pairs[0]
    sample = {"prompt": pair["prompt"], "response": pair["chosen"], "label": {"answer": 4}, "metadata": None}
    answer = await client.post("/slime/reward", json=sample)
    assert answer.status_code == 200, answer.text
    expected = offline.score([{"prompt": pair["prompt"], "response": pair["chosen"]}])[0]
    assert answer.json()["reward"] == pytest.approx(expected, abs=TOL)
    messages = [{"role": "user", "content": pair["prompt"]}]
    as_chat = await client.post("/slime/reward", json={"prompt": messages, "response": pair["chosen"]})
    assert as_chat.json()["reward"] == pytest.approx(expected, abs=TOL)


async def test_slime_templated_prompt_is_scored_as_formatted_text(client, checkpoint, offline, pairs):
    pair = pairs[1]
    prompt = templated(checkpoint[1], pair["prompt"])  # slime --apply-chat-template: the prompt as the policy saw it
    answer = await client.post("/slime/reward?templated=true", json={"prompt": prompt, "response": pair["chosen"]})
    assert answer.status_code == 200, answer.text
    expected = offline.score([{"text": prompt + pair["chosen"]}])[0]
    assert answer.json()["reward"] == pytest.approx(expected, abs=TOL)


async def test_slime_errors_name_the_samples_own_field(client):
    missing = await client.post("/slime/reward", json={"prompt": "2+2?"})
    assert missing.status_code == 422 and missing.json()["error"]["param"] == "response"
    bad_role = await client.post(
        "/slime/reward", json={"prompt": [{"role": "robot", "content": "hi"}], "response": "hello"}
    )
    assert bad_role.status_code == 422 and bad_role.json()["error"]["param"].startswith("prompt[0]")


# -- the Cohere / Jina rerank shape ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
async def test_rerank_shape_ranks_documents_by_reward(client, offline, pairs, path):
    query = pairs[0]["prompt"]
    docs = [pairs[0]["chosen"], {"text": pairs[0]["rejected"]}, pairs[1]["chosen"], pairs[2]["rejected"]]
    texts = [d if isinstance(d, str) else d["text"] for d in docs]
    rewards = offline.score([{"prompt": query, "response": t} for t in texts])
    best = sorted(range(len(texts)), key=lambda i: -rewards[i])
    answer = await client.post(path, json={"model": None, "query": query, "documents": docs, "top_n": 3})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [r["index"] for r in body["results"]] == best[:3]
    for result in body["results"]:
        assert result["relevance_score"] == pytest.approx(sigmoid(rewards[result["index"]]), abs=TOL)
        assert result["document"] == {"text": texts[result["index"]]}
    raw = await client.post(
        path, json={"query": query, "documents": texts, "use_activation": False, "return_documents": False}
    )
    results = raw.json()["results"]
    assert [r["relevance_score"] for r in results] == pytest.approx([rewards[i] for i in best], abs=TOL)
    assert all("document" not in r for r in results)


async def test_v1_rerank_still_takes_rmserves_own_body_and_tells_the_two_apart(client, offline, pairs):
    group = {"prompt": pairs[0]["prompt"], "responses": [pairs[0]["chosen"], pairs[0]["rejected"]]}
    native = await client.post("/v1/rerank", json={"groups": [group]})
    assert native.status_code == 200 and "ranking" in native.json()["results"][0]
    typo = await client.post("/v1/rerank", json={"groups": [group], "top_kk": 1})  # native: unknown fields are 422
    assert typo.status_code == 422 and typo.json()["error"]["param"] == "top_kk"
    bad = await client.post("/rerank", json={"query": "q", "documents": ["fine", 7]})
    assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("documents[1]")
    empty = await client.post("/v2/rerank", json={"query": "q", "documents": []})
    assert empty.status_code == 200 and empty.json()["results"] == []


async def test_scoring_responses_say_whether_the_model_is_batch_invariant(client, app: LiveApp):
    body = (await client.post("/v1/score", json={"items": [{"text": "hello"}]})).json()
    card = (await client.get("/v1/models")).json()["data"][0]
    assert body["batch_invariant"] is card.get("batch_invariant", False) is False


# -- a served model's checkpoint directory is one of its names -------------------------------------------------------
async def test_the_demo_models_directory_names_the_demo(demo_model_dir):
    with running_app(demo_config("demo"), "inprocess") as demo:
        async with async_client(demo) as client:
            answer = await client.post("/classify", json={"model": str(demo_model_dir), "input": "Q: hi A: hello"})
            assert answer.status_code == 200, answer.text
            names = (await client.get("/v1/models")).json()["data"][0]["names"]
    assert str(demo_model_dir) in names and "demo" in names
