"""What the clients send (routes, bodies, headers, timeouts) and the methods' plain results."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest
from client_fakes import URL, FakeServer, call, make_client

from rmserve.client import AsyncRewardClient, ModelInfo, PreferenceResult, RankedResponse, RewardClient


def test_score_sends_pairs_to_v1_score(mode, fake):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    rewards = call(make_client(mode, fake), "score", ["What is 2+2?", chat], ["r4", "r5"], normalize=True)
    assert rewards == [4.0, 5.0]
    (request,) = fake.requests
    assert (request.method, request.url) == ("POST", httpx.URL(f"{URL}/v1/score"))
    assert request.headers["content-type"] == "application/json"
    assert fake.bodies[0] == {
        "items": [{"prompt": "What is 2+2?", "response": "r4"}, {"prompt": chat, "response": "r5"}],
        "normalize": True,
    }


def test_score_items_sends_each_run_of_one_form_as_its_own_request_and_keeps_input_order(mode, fake):
    # A request holds items of one form (API.md); a call may mix them.
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "r2"}]}
    items = [
        {"prompt": "p", "response": "r1"},
        {"prompt": "q", "response": "r1b"},
        chat,
        {"text": "already formatted"},
        {"input_ids": [1, 2, 3]},
        {"prompt": "p2", "response": "r6"},
    ]
    value = {"prompt": 1.0, "messages": 2.0, "text": 3.0, "input_ids": 4.0}
    fake.answer = lambda request, body: httpx.Response(
        200,
        json={"model": "m", "rewards": [value[next(iter(i))] for i in body["items"]], "truncated": [], "usage": {}},
    )
    assert call(make_client(mode, fake), "score_items", items) == [1.0, 1.0, 2.0, 3.0, 4.0, 1.0]
    assert sorted(map(str, fake.bodies)) == sorted(
        map(
            str, [{"items": run, "normalize": False} for run in (items[:2], [chat], [items[3]], [items[4]], [items[5]])]
        )
    )


def test_token_ids_from_arrays_are_serialised_as_lists(mode, fake):
    class Tensor:  # stands in for a numpy array / torch tensor only in having .tolist()
        def tolist(self):
            return [5, 6, 7]

    fake.answer = lambda request, body: httpx.Response(200, json={"model": "m", "rewards": [0.5], "truncated": []})
    assert call(make_client(mode, fake), "score_items", [{"input_ids": Tensor()}]) == [0.5]
    assert fake.bodies[0]["items"] == [{"input_ids": [5, 6, 7]}]


def test_preference_and_rerank_bodies_and_results(mode, fake):
    client = make_client(mode, fake, model="fake-rm")
    (pref,) = call(client, "preference", ["p"], ["r1"], ["r3"])
    assert fake.bodies[-1] == {
        "pairs": [{"prompt": "p", "response_a": "r1", "response_b": "r3"}],
        "normalize": False,
        "model": "fake-rm",
    }
    assert isinstance(pref, PreferenceResult)
    assert (pref.reward_a, pref.reward_b, pref.preferred) == (1.0, 3.0, "b")
    assert pref.prob_a == pytest.approx(1 / (1 + 2.718281828459045**2))

    (ranked,) = call(client, "rerank", ["p"], [["r2", "r9", "r4"]])
    assert fake.bodies[-1] == {
        "groups": [{"prompt": "p", "responses": ["r2", "r9", "r4"]}],
        "top_k": None,
        "normalize": False,
        "model": "fake-rm",
    }
    assert ranked.best_index == 1
    assert ranked.ranking == [RankedResponse(1, 9.0), RankedResponse(2, 4.0), RankedResponse(0, 2.0)]
    index, reward = ranked.ranking[0]  # a ranking entry unpacks as (index, reward)
    assert (index, reward) == (1, 9.0)


def test_models_health_ready(mode, fake):
    client = make_client(mode, fake)
    assert call(client, "models") == [ModelInfo(id="fake-rm", dtype="float32", max_length=512)]
    assert call(client, "health") is True
    assert call(client, "ready") is True
    assert [(r.method, r.url.path) for r in fake.requests] == [
        ("GET", "/v1/models"),
        ("GET", "/health"),
        ("GET", "/ready"),
    ]
    assert all(r.content == b"" for r in fake.requests)


@pytest.mark.parametrize("failure", [503, 500, httpx.ConnectError("refused")])
def test_probes_answer_false_without_retrying(mode, failure):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if isinstance(failure, Exception):
            raise failure
        return httpx.Response(failure, json={"error": {"message": "no", "type": "not_ready", "code": failure}})

    client = make_client(mode, handler, max_retries=5)
    assert call(client, "ready") is False
    assert call(client, "health") is False
    assert len(seen) == 2


def test_api_key_argument_env_and_none(mode, fake, monkeypatch):
    call(make_client(mode, fake, api_key="sk-arg"), "health")
    monkeypatch.setenv("RMSERVE_API_KEY", "sk-env")
    env_client = make_client(mode, fake)  # reads the environment now, at construction
    monkeypatch.setenv("RMSERVE_API_KEY", "sk-changed-later")
    call(env_client, "health")
    call(make_client(mode, fake, api_key="sk-arg-wins"), "health")
    monkeypatch.delenv("RMSERVE_API_KEY")
    call(make_client(mode, fake), "health")
    auth = [r.headers.get("authorization") for r in fake.requests]
    assert auth == ["Bearer sk-arg", "Bearer sk-env", "Bearer sk-arg-wins", None]
    assert "sk-" not in repr(env_client)


def test_base_url_from_argument_env_or_default(monkeypatch):
    assert RewardClient().base_url == "http://127.0.0.1:8000"
    monkeypatch.setenv("RMSERVE_BASE_URL", "http://rm.internal:9000/")
    assert RewardClient().base_url == "http://rm.internal:9000"
    assert AsyncRewardClient().base_url == "http://rm.internal:9000"
    assert RewardClient("http://other:1/prefix/").base_url == "http://other:1/prefix"


def test_base_url_path_prefix_is_kept(mode):
    seen = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(200, json={"model": "m", "rewards": [1.0], "truncated": []})

    client = make_client(mode, record)
    client.base_url = "http://gateway/rm"
    call(client, "score", ["p"], ["r1"])
    assert seen == [httpx.URL("http://gateway/rm/v1/score")]


def test_timeout_per_client_and_per_call(mode, fake):
    call(make_client(mode, fake, timeout=12.5), "score", ["p"], ["r"])
    call(make_client(mode, fake, timeout=12.5), "score", ["p"], ["r"], timeout=3.0)
    call(make_client(mode, fake), "health", timeout=httpx.Timeout(1.0, connect=0.5))
    timeouts = [r.extensions["timeout"] for r in fake.requests]
    assert timeouts[0] == {"connect": 12.5, "read": 12.5, "write": 12.5, "pool": 12.5}
    assert timeouts[1] == {"connect": 3.0, "read": 3.0, "write": 3.0, "pool": 3.0}
    assert timeouts[2] == {"connect": 0.5, "read": 1.0, "write": 1.0, "pool": 1.0}


def test_empty_inputs_send_nothing(mode, fake):
    client = make_client(mode, fake)
    assert call(client, "score", [], []) == []
    assert call(client, "preference", [], [], []) == []
    assert call(client, "rerank", [], []) == []
    assert call(client, "score_detailed", []).rewards == []
    assert fake.requests == []


@pytest.mark.parametrize(
    ("method", "args", "error", "match"),
    [
        ("score", (["p", "q"], ["r"]), ValueError, "prompts=2, responses=1"),
        ("score", ("a prompt", ["r"]), TypeError, "prompts must be a list"),
        ("score", (["p"], "r"), TypeError, "responses must be a list"),
        ("preference", (["p"], ["a"], ["b", "c"]), ValueError, "responses_b=2"),
        ("rerank", (["p"], [["a"], ["b"]]), ValueError, "groups_of_responses=2"),
        ("rerank", (["p"], ["ab"]), TypeError, "each group of responses must be a list"),
    ],
)
def test_bad_arguments_fail_before_sending(mode, fake, method, args, error, match):
    with pytest.raises(error, match=match):
        call(make_client(mode, fake), method, *args)
    assert fake.requests == []


def test_generators_are_accepted(mode, fake):
    rewards = call(make_client(mode, fake), "score", (p for p in ["p", "q"]), (f"r{i}" for i in range(2)))
    assert rewards == [0.0, 1.0]


def test_sync_context_manager_closes_its_own_client_only():
    with RewardClient(URL) as client:
        inner = client._http
    assert inner.is_closed
    mine = httpx.Client(transport=httpx.MockTransport(FakeServer().handle))
    with RewardClient(URL, http_client=mine) as client:
        assert client.health() is True
    assert not mine.is_closed
    mine.close()


async def test_async_context_manager_closes_its_own_client_only():
    async with AsyncRewardClient(URL) as client:
        inner = client._http
    assert inner.is_closed
    mine = httpx.AsyncClient(transport=httpx.MockTransport(FakeServer().handle_async))
    async with AsyncRewardClient(URL, http_client=mine) as client:
        assert await client.health() is True
        # Runs on the caller's loop without blocking it: two calls overlap.
        both = await asyncio.gather(client.score(["p"], ["r1"]), client.score(["p"], ["r2"]))
    assert both == [[1.0], [2.0]]
    assert not mine.is_closed
    await mine.aclose()


def test_invalid_client_settings_are_rejected():
    with pytest.raises(ValueError):
        RewardClient(URL, max_items_per_request=0)
    with pytest.raises(ValueError):
        AsyncRewardClient(URL, max_concurrency=0)


def test_import_pulls_in_no_heavy_dependency_or_server_code():
    code = (
        "import sys, rmserve.client\n"
        "heavy = {'torch', 'transformers', 'ray', 'numpy'}\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy"
        " or m.startswith(('rmserve.model', 'rmserve.serve')))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_label_scores_body_repeats_the_query_and_labels_in_every_chunk(mode, fake):
    """SGLang's /v1/score body for a judge: items in chunks, each with the query, labels and options; in order."""
    fake.answer = lambda request, body: httpx.Response(
        200, json={"scores": [[float(len(item)), 0.0] for item in body["items"]], "model": "j", "object": "scoring"}
    )
    client = make_client(mode, fake, model="j", max_items_per_request=2)
    scores = call(client, "label_scores", [1, 2], [[3], [4, 5], [6, 7, 8]], (9, 10), apply_softmax=True)
    assert scores == [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]
    shared = {"query": [1, 2], "label_token_ids": [9, 10], "apply_softmax": True, "item_first": False, "model": "j"}
    assert fake.bodies == [{"items": [[3], [4, 5]], **shared}, {"items": [[6, 7, 8]], **shared}]
    assert {request.url.path for request in fake.requests} == {"/v1/score"}
