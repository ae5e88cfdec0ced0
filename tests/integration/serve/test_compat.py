"""Issue 5, compatibility routes, against a real Ray Serve app: OpenRLHF's ``/get_reward`` and vLLM's ``/classify``
replayed as those trainers send them (one text per request, many at once), with every reward equal to
``/v1/score`` on the same text, through the same Scorer batching.

The model is a tiny checkpoint whose tokenizer has a ``<pad>`` token of its own (not EOS), like the RMs
OpenRLHF left-pads prompts for; its chat template writes ``<s>`` itself, so texts arrive with a BOS."""

from __future__ import annotations

import asyncio
import math
import time

import httpx
import pytest
from serve_harness import LiveApp, async_client, demo_config, running_app

from rmserve.model.synthetic import make_preference_pairs
from rmserve.serve import build_app

pytestmark = pytest.mark.ray

TOL = 1e-5  # fp32 on CPU
MEAN, STD = 0.5, 2.0
PAD = "<pad>"
NORM_APP, NORM_PREFIX = "rmserve-norm", "/norm"
LIMIT = 64  # items per request


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    path, _, tokenizer = checkpoint_factory("score", "llama", "pad")
    assert tokenizer.pad_token == PAD and tokenizer.eos_token != PAD
    return path, tokenizer


@pytest.fixture(scope="module")
def app(checkpoint):
    config = demo_config(
        checkpoint[0], batching={"batch_wait_timeout_s": 0.01}, limits={"max_items_per_request": LIMIT}
    )
    with running_app(config) as live:
        yield live


@pytest.fixture(scope="module")
def norm_app(app, checkpoint):
    """The same model with server-side normalisation for the compatibility routes."""
    from ray import serve

    config = demo_config(
        checkpoint[0], model={"reward_mean": MEAN, "reward_std": STD}, compat={"normalize": True}, app_name=NORM_APP
    )
    serve.run(build_app(config), name=NORM_APP, route_prefix=NORM_PREFIX)
    yield NORM_PREFIX
    serve.delete(NORM_APP)


@pytest.fixture
async def client(app):
    async with async_client(app) as c:
        yield c


def decoded_samples(tokenizer, n: int) -> list[tuple[str, str]]:
    """``(query as the trainer decodes it, the text without padding)``: chat-formatted prompt + response + EOS,
    left-padded prompts and right-padded responses decoded with special tokens, as OpenRLHF sends them."""
    out = []
    for k, pair in enumerate(make_preference_pairs(n, seed=11)[:n]):
        messages = [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": pair["chosen"]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert text.startswith(tokenizer.bos_token) and text.endswith(tokenizer.eos_token)
        out.append((PAD * (k % 4) + text + PAD * (k % 3), text))
    return out


async def score_texts(client: httpx.AsyncClient, texts: list[str], prefix: str = "") -> dict:
    response = await client.post(f"{prefix}/v1/score", json={"items": [{"text": t} for t in texts]})
    assert response.status_code == 200, response.text
    return response.json()


def assert_error(response: httpx.Response, status: int, type_: str = "invalid_request") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code", "param"}
    assert (body["error"]["type"], body["error"]["code"]) == (type_, status)
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


# -- OpenRLHF: POST /get_reward --------------------------------------------------------------------------
async def test_get_reward_replays_openrlhf_one_query_per_request(app: LiveApp, client, checkpoint, offline):
    samples = decoded_samples(checkpoint[1], 64)
    expected = (await score_texts(client, [text for _, text in samples]))["rewards"]
    assert expected == pytest.approx(offline.score([{"text": t} for _, t in samples]), abs=TOL)
    assert len({round(r, 4) for r in expected}) > 50  # distinct rewards, so a mix-up would show
    before = (await app.stats())["batching"]
    responses = await asyncio.gather(
        *(
            client.post("/get_reward", json={"query": [query], "prompts": [query[:20]], "labels": [""]})
            for query, _ in samples
        )
    )
    after = (await app.stats())["batching"]
    for response, reward in zip(responses, expected, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"rewards", "scores", "extra_logs"} and body["extra_logs"] == {}
        assert body["rewards"] == pytest.approx([reward], abs=TOL)
        assert body["scores"] == body["rewards"]
    assert after["items"] - before["items"] == 64
    assert after["batches"] - before["batches"] < 64  # queries of different requests shared forward passes


async def test_get_reward_scores_the_text_once_formatted_with_one_bos(client, checkpoint, offline):
    """The decoded chat text scores exactly like the native conversation item the server formats itself."""
    messages = [{"role": "user", "content": "Tell me about owls."}, {"role": "assistant", "content": "Owls hunt."}]
    query = PAD * 3 + checkpoint[1].apply_chat_template(messages, tokenize=False) + PAD * 2
    response = await client.post("/get_reward", json={"query": [query]})
    native = await client.post("/v1/score", json={"items": [{"messages": messages}]})
    assert response.json()["rewards"] == pytest.approx(native.json()["rewards"], abs=TOL)
    assert response.json()["rewards"] == pytest.approx(offline.score([{"messages": messages}]), abs=TOL)
    unstripped = (await score_texts(client, [query]))["rewards"][0]
    assert abs(unstripped - response.json()["rewards"][0]) > 1e-4  # stripping the padding is not a no-op


async def test_get_reward_with_several_queries_keeps_their_order(client, checkpoint):
    samples = decoded_samples(checkpoint[1], 12)
    expected = (await score_texts(client, [text for _, text in samples]))["rewards"]
    response = await client.post("/get_reward", json={"query": [q for q, _ in samples], "labels": None, "x": 1})
    assert response.status_code == 200, response.text
    assert response.json()["rewards"] == pytest.approx(expected, abs=TOL)


# -- vLLM / verl: POST /classify ---------------------------------------------------------------------------
async def test_classify_replays_verl_one_input_per_request(client, checkpoint, offline):
    texts = [text for _, text in decoded_samples(checkpoint[1], 64)]
    native = await score_texts(client, texts)
    bodies = [
        {"model": offline.model_id, "input": t, "use_activation": False, "add_special_tokens": False} for t in texts
    ]
    started = int(time.time())
    responses = await asyncio.gather(*(client.post("/classify", json=body) for body in bodies))
    for response, text, reward in zip(responses, texts, native["rewards"], strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"id", "object", "created", "model", "data", "usage"}
        assert body["id"].startswith("classify-") and len(body["id"]) == len("classify-") + 32
        assert body["object"] == "list" and body["model"] == offline.model_id
        assert started - 1 <= body["created"] <= time.time() + 1
        assert body["data"] == [
            {"index": 0, "label": None, "probs": pytest.approx([reward], abs=TOL), "num_classes": 1}
        ]
        tokens = len(offline.tokenize({"text": text}))
        assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}
    assert len({r.json()["id"] for r in responses}) == 64


@pytest.mark.parametrize(
    ("flags", "activated"),
    [({}, True), ({"use_activation": True}, True), ({"use_activation": False}, False), ({"activation": False}, False)],
)
async def test_classify_list_input_and_activation(client, checkpoint, flags, activated):
    texts = [text for _, text in decoded_samples(checkpoint[1], 3)]
    native = await score_texts(client, texts)
    response = await client.post("/classify", json={"input": texts, "priority": 0, **flags})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    expected = [1 / (1 + math.exp(-r)) if activated else r for r in native["rewards"]]
    assert [d["probs"][0] for d in body["data"]] == pytest.approx(expected, abs=TOL)
    assert body["usage"]["prompt_tokens"] == native["usage"]["input_tokens"]


# -- server-side normalisation --------------------------------------------------------------------------
async def test_compat_routes_normalise_when_configured(client, norm_app, checkpoint):
    samples = decoded_samples(checkpoint[1], 5)
    texts = [text for _, text in samples]
    raw = (await score_texts(client, texts))["rewards"]
    normalized = [(r - MEAN) / STD for r in raw]
    reward = await client.post(f"{norm_app}/get_reward", json={"query": [q for q, _ in samples]})
    assert reward.status_code == 200, reward.text
    assert reward.json()["rewards"] == pytest.approx(normalized, abs=TOL)
    off = await client.post(f"{norm_app}/classify", json={"input": texts, "use_activation": False})
    assert [d["probs"][0] for d in off.json()["data"]] == pytest.approx(normalized, abs=TOL)
    on = await client.post(f"{norm_app}/classify", json={"input": texts})
    assert [d["probs"][0] for d in on.json()["data"]] == pytest.approx(
        [1 / (1 + math.exp(-n)) for n in normalized], abs=TOL
    )
    native = await score_texts(client, texts, prefix=norm_app)  # the native route still answers raw unless asked
    assert native["rewards"] == pytest.approx(raw, abs=TOL)


# -- errors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "kwargs", "status", "param"),
    [
        ("/get_reward", {"content": b'{"query": ["x"'}, 422, None),
        ("/get_reward", {"json": {"query": "<s>not a list</s>"}}, 422, "query"),
        ("/get_reward", {"json": {"query": ["<s>ok</s>", 7]}}, 422, "query[1]"),
        ("/get_reward", {"json": {"prompts": ["p"]}}, 422, "query"),
        ("/get_reward", {"json": {"query": ["<s>ok</s>", PAD * 3]}}, 422, "query[1]"),  # nothing left to score
        ("/classify", {"content": b"{not json"}, 400, None),
        ("/classify", {"json": {"input": [[1, 2], [3, 100000]]}}, 400, "input[1][1]"),  # outside the vocabulary
        ("/classify", {"json": {"input": [5, -1]}}, 400, "input[1]"),
        ("/classify", {"json": {"input": 5}}, 400, "input"),
        ("/classify", {"json": {"input": ["ok", ""]}}, 400, "input[1]"),
        ("/classify", {"json": {"input": "ok", "use_activation": "yes"}}, 400, "use_activation"),
        ("/classify", {"json": {"input": "ok", "model": "some-other-model"}}, 404, "model"),
    ],
)
async def test_compat_errors_have_the_error_body_and_name_the_field(client, path, kwargs, status, param):
    error = assert_error(await client.post(path, **kwargs), status)
    assert error["param"] == param, error


async def test_compat_routes_enforce_the_item_limit(client):
    too_many = ["<s>a</s>"] * (LIMIT + 1)
    assert_error(await client.post("/get_reward", json={"query": too_many}), 413, "request_too_large")
    assert_error(await client.post("/classify", json={"input": too_many}), 413, "request_too_large")


@pytest.mark.slow  # Serve retries the failing Scorer constructor for ~25 s; `make test-all`
def test_normalize_without_model_statistics_refuses_to_start(app, checkpoint):
    """compat.normalize on a model without mean/std is a deployment error, not a 400 on every request."""
    from ray import serve

    config = demo_config(checkpoint[0], compat={"normalize": True}, app_name="rmserve-bad")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="Deploying application rmserve-bad failed"):
        serve.run(build_app(config), name="rmserve-bad", route_prefix="/bad")
    status = serve.status().applications["rmserve-bad"]
    serve.delete("rmserve-bad")
    assert "compat.normalize is on but model" in status.deployments["Scorer"].message
    assert time.monotonic() - started < 120
