"""Ensembles in the SDK: ``member_rewards`` and ``spread`` reach the typed results (merged across chunks in input
order), and every scoring method takes a per-call ``model=`` that overrides the client's."""

from __future__ import annotations

import json

import httpx
import pytest
from client_fakes import (
    ENSEMBLE,
    FakeServer,
    call,
    later_chunks_finish_first,
    make_client,
    member_rewards_of,
    spread_of,
)

from rmserve.client import APIResponseValidationError, AsyncRewardClient, RewardClient

SCORING_CALLS = {  # method -> positional arguments of a one-element call
    "score": (["p"], ["r1"]),
    "score_items": ([{"prompt": "p", "response": "r1"}],),
    "score_detailed": ([{"prompt": "p", "response": "r1"}],),
    "preference": (["p"], ["r1"], ["r2"]),
    "rerank": (["p"], [["r1", "r2"]]),
}


def test_score_detailed_merges_member_rewards_and_spread_in_input_order_across_chunks(mode):
    n = 22
    fake = FakeServer(delay=later_chunks_finish_first(n, 0.05))
    client = make_client(mode, fake, model="fake-rm", max_items_per_request=4, max_concurrency=6)
    items = [{"prompt": f"prompt {i}", "response": f"r{i}"} for i in range(n)]

    result = call(client, "score_detailed", items, model=ENSEMBLE)

    assert fake.completed != sorted(fake.completed)  # the chunks really did complete out of order
    assert [len(body["items"]) for body in fake.bodies] == [4, 4, 4, 4, 4, 2]
    assert {body["model"] for body in fake.bodies} == {ENSEMBLE}  # the call's model, on every chunk
    assert result.model == ENSEMBLE
    assert result.rewards == [float(i) for i in range(n)]
    assert result.member_rewards == {"up": [float(i) for i in range(n)], "down": [1.0 - i for i in range(n)]}
    assert result.spread == [spread_of(f"r{i}") for i in range(n)]
    assert list(result.member_rewards) == ["up", "down"]  # the server's member order is kept


def test_a_single_model_answer_has_no_ensemble_fields(mode, fake):
    client = make_client(mode, fake, max_items_per_request=2)
    detailed = call(client, "score_detailed", [{"prompt": "p", "response": f"r{i}"} for i in range(5)])
    assert (detailed.member_rewards, detailed.spread) == (None, None)
    (pair,) = call(client, "preference", ["p"], ["r1"], ["r2"])
    assert (pair.member_rewards_a, pair.member_rewards_b, pair.spread_a, pair.spread_b) == (None,) * 4
    (group,) = call(client, "rerank", ["p"], [["r1", "r2"]])
    assert (group.member_rewards, group.spread) == (None, None)
    assert call(client, "score_detailed", []).member_rewards is None  # an empty call sends nothing


def test_preference_and_rerank_carry_each_pair_and_group_ensemble_fields(mode, fake):
    client = make_client(mode, fake, model=ENSEMBLE, max_items_per_request=4)  # 2 pairs per request
    a, b = [f"r{i}" for i in range(5)], [f"r{10 - i}" for i in range(5)]
    pairs = call(client, "preference", ["p"] * 5, a, b)
    assert len(fake.bodies) == 3
    for result, ra, rb in zip(pairs, a, b, strict=True):
        assert (result.member_rewards_a, result.member_rewards_b) == (member_rewards_of(ra), member_rewards_of(rb))
        assert (result.spread_a, result.spread_b) == (spread_of(ra), spread_of(rb))

    groups = [["r3", "r9", "r1"], ["r7", "r2"]]
    ranked = call(client, "rerank", ["p", "q"], groups, top_k=1)
    for result, group in zip(ranked, groups, strict=True):
        assert len(result.ranking) == 1
        # Per response in the group's input order, not the ranking's (and not cut by top_k).
        assert result.member_rewards == {name: [member_rewards_of(r)[name] for r in group] for name in ("up", "down")}
        assert result.spread == [spread_of(r) for r in group]


@pytest.mark.parametrize("method", sorted(SCORING_CALLS))
def test_model_per_call_overrides_the_clients_and_absent_means_the_servers_first(mode, fake, method):
    args = SCORING_CALLS[method]
    call(make_client(mode, fake, model="default-rm"), method, *args, model=ENSEMBLE)
    call(make_client(mode, fake, model="default-rm"), method, *args)
    call(make_client(mode, fake), method, *args, model="other-rm")
    call(make_client(mode, fake), method, *args)
    assert [body.get("model", "<absent>") for body in fake.bodies] == [ENSEMBLE, "default-rm", "other-rm", "<absent>"]


@pytest.mark.parametrize("method", sorted(SCORING_CALLS))
@pytest.mark.parametrize(("model", "error"), [(7, TypeError), ("", ValueError), (["helpful"], TypeError)])
def test_a_bad_model_argument_fails_before_sending_and_names_it(mode, fake, method, model, error):
    with pytest.raises(error, match=r"^model must be"):
        call(make_client(mode, fake), method, *SCORING_CALLS[method], model=model)
    assert fake.requests == []


@pytest.mark.parametrize("cls", [RewardClient, AsyncRewardClient])
def test_a_bad_client_model_is_refused_at_construction(cls):
    with pytest.raises(TypeError, match=r"^model must be .* got int"):
        cls("http://rm.test", model=3)
    with pytest.raises(ValueError, match=r"^model must be a non-empty"):
        cls("http://rm.test", model="")


def ensemble_answer(items: list[dict], *, members: tuple[str, ...] = ("up", "down"), short: int = 0) -> dict:
    """A ``/v1/score`` answer with ensemble fields; ``short`` drops that many values from the first member's list."""
    responses = [item["response"] for item in items]
    member_rewards = {name: [member_rewards_of(r).get(name, 0.0) for r in responses] for name in members}
    member_rewards[members[0]] = member_rewards[members[0]][: len(responses) - short]
    return {
        "model": ENSEMBLE,
        "rewards": [0.0] * len(items),
        "truncated": [],
        "member_rewards": member_rewards,
        "spread": [spread_of(r) for r in responses],
    }


@pytest.mark.parametrize(
    ("later_chunk", "match"),
    [
        (lambda items: {"model": ENSEMBLE, "rewards": [0.0] * len(items), "truncated": []}, r"items\[3:6\]"),
        (lambda items: ensemble_answer(items, members=("up", "sideways")), r"sideways"),
        (lambda items: ensemble_answer(items, short=1), r"returned 2 member_rewards\['up'\] values for 3 inputs"),
    ],
)
def test_chunks_that_disagree_on_the_ensemble_fields_are_an_unexpected_answer(mode, later_chunk, match):
    def handler(request: httpx.Request) -> httpx.Response:
        items = json.loads(request.content)["items"]
        first = items[0]["response"] == "r0"
        return httpx.Response(200, json=ensemble_answer(items) if first else later_chunk(items))

    client = make_client(mode, handler, max_items_per_request=3, max_concurrency=1)
    with pytest.raises(APIResponseValidationError, match=match):
        call(client, "score_detailed", [{"prompt": "p", "response": f"r{i}"} for i in range(6)], model=ENSEMBLE)
