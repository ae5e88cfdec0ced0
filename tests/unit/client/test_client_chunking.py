"""Chunking: request sizes, bounded concurrency, and reassembly in input order under out-of-order completion."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from client_fakes import FakeServer, call, later_chunks_finish_first, make_client, reward_of

from rmserve.client import InvalidRequestError
from rmserve.client._calls import plan_chunks


@pytest.mark.parametrize(
    ("weights", "limit", "runs"),
    [
        ([], 4, []),
        ([1] * 5, 2, [(0, 2), (2, 4), (4, 5)]),
        ([1] * 4, 4, [(0, 4)]),
        ([2, 2, 2], 4, [(0, 2), (2, 3)]),
        ([3, 1, 4, 1], 4, [(0, 2), (2, 3), (3, 4)]),
        ([9, 1], 4, [(0, 1), (1, 2)]),  # an oversize element goes alone; the server judges it
    ],
)
def test_plan_chunks(weights, limit, runs):
    assert plan_chunks(weights, limit) == runs


def test_score_is_reassembled_in_order_when_chunks_finish_out_of_order(mode):
    n = 40
    fake = FakeServer(delay=later_chunks_finish_first(n, 0.05), truncate_local=(0, 2))
    client = make_client(mode, fake, max_items_per_request=4, max_concurrency=10)
    items = [{"prompt": f"prompt {i}", "response": f"r{i}"} for i in range(n)]

    result = call(client, "score_detailed", items)

    assert fake.completed != sorted(fake.completed)  # the chunks really did complete out of order
    assert result.rewards == [float(i) for i in range(n)]
    # Each chunk reported local indices 0 and 2 as truncated; they come back as indices into the whole call.
    assert result.truncated == sorted([s for s in range(0, n, 4)] + [s + 2 for s in range(0, n, 4)])
    assert result.usage.input_tokens == 10 * n
    assert result.model == "fake-rm"
    assert [len(body["items"]) for body in fake.bodies] == [4] * 10


def test_score_sends_at_most_max_items_per_request_and_keeps_order(mode, fake):
    client = make_client(mode, fake, max_items_per_request=7, max_concurrency=3)
    rewards = call(client, "score", ["p"] * 30, [f"r{i}" for i in range(30)])
    assert rewards == [float(i) for i in range(30)]
    sizes = sorted(len(body["items"]) for body in fake.bodies)
    assert sizes == [2, 7, 7, 7, 7]


@pytest.mark.parametrize("concurrency", [1, 3])
def test_concurrency_is_bounded(mode, concurrency):
    fake = FakeServer(delay=lambda body: 0.01)
    client = make_client(mode, fake, max_items_per_request=2, max_concurrency=concurrency)
    call(client, "score", ["p"] * 20, ["r"] * 20)
    assert len(fake.requests) == 10
    assert fake.max_in_flight == concurrency  # reaches the bound, never exceeds it


@pytest.mark.parametrize(
    ("server_message", "client_message"),
    [
        ("items[{i}].response: Input should be a valid string", "items[7].response: Input should be a valid string"),
        ("items[{i}].response: Field required", "items[7].response: Field required"),  # request validation
        ("a batch with items[{i}] in it", "a batch with items[1] in it"),  # only a leading name is rewritten
    ],
)
def test_error_in_a_later_chunk_names_the_item_in_the_whole_call(mode, server_message, client_message):
    def handler(request: httpx.Request) -> httpx.Response:
        items = json.loads(request.content)["items"]
        for j, item in enumerate(items):
            if item["response"] == "bad":
                message = server_message.format(i=j)
                error = {
                    "message": message,
                    "type": "invalid_request",
                    "code": 422,
                    "param": f"items[{j}].response",
                }
                return httpx.Response(422, json={"error": error})
        return httpx.Response(200, json={"model": "m", "rewards": [0.0] * len(items), "truncated": []})

    responses = ["ok"] * 10
    responses[7] = "bad"  # item 1 of the chunk [6, 9)
    client = make_client(mode, handler, max_items_per_request=3)
    with pytest.raises(InvalidRequestError) as info:
        call(client, "score", ["p"] * 10, responses)
    assert info.value.param == "items[7].response"
    assert info.value.message == client_message
    assert str(info.value) == f"Error code: 422 invalid_request - {client_message}"


def test_a_failed_chunk_fails_the_call_without_waiting_for_slow_ones(mode):
    def delay(body: dict) -> float:
        return 0.0 if reward_of(body["items"][0]["response"]) == 2 else 0.3

    fake = FakeServer(delay=delay)
    original = fake.answer

    def answer(request, body):
        if reward_of(body["items"][0]["response"]) == 2:
            return httpx.Response(413, json={"error": {"message": "too big", "type": "request_too_large", "code": 413}})
        return original(request, body)

    fake.answer = answer
    client = make_client(mode, fake, max_items_per_request=2, max_concurrency=4, max_retries=0)
    start = time.perf_counter()
    with pytest.raises(Exception, match="too big"):
        call(client, "score", ["p"] * 8, [f"r{i}" for i in range(8)])
    assert time.perf_counter() - start < 0.25


def test_preference_chunks_by_pairs_and_keeps_order(mode, fake):
    n = 9
    client = make_client(mode, fake, max_items_per_request=4)  # a pair counts as two items: 2 pairs per request
    results = call(client, "preference", ["p"] * n, [f"r{i}" for i in range(n)], [f"r{n - i}" for i in range(n)])
    assert [len(body["pairs"]) for body in fake.bodies] == [2, 2, 2, 2, 1]
    assert [(r.reward_a, r.reward_b) for r in results] == [(float(i), float(n - i)) for i in range(n)]
    assert [r.preferred for r in results] == ["b"] * 5 + ["a"] * 4


def test_rerank_chunks_whole_groups_and_keeps_order(mode, fake):
    groups = [[f"r{g * 10 + j}" for j in range(size)] for g, size in enumerate([3, 3, 5, 1, 2])]
    client = make_client(mode, fake, max_items_per_request=6)
    results = call(client, "rerank", [f"p{g}" for g in range(5)], groups, top_k=2)
    assert [[len(group["responses"]) for group in body["groups"]] for body in fake.bodies] == [[3, 3], [5, 1], [2]]
    assert all(body["top_k"] == 2 for body in fake.bodies)
    assert [r.best_index for r in results] == [2, 2, 4, 0, 1]
    assert [[(x.index, x.reward) for x in r.ranking] for r in results][2] == [(4, 24.0), (3, 23.0)]
