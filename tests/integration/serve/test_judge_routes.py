"""A causal-LM judge through the server, in both runtimes: SGLang's ``POST /v1/score`` body (``query``, ``items``,
``label_token_ids``, ``apply_softmax``, ``item_first``) equals transformers' own forward of the same checkpoint —
``softmax(logits[-1])[labels]`` or ``softmax(logits[-1][labels])`` — for text and token ids; concurrent requests with
other labels on the same text get their own numbers; the errors name the caller's field; a pairwise judge's
``/v1/preference`` is P(first verdict token) of the templated pair."""

from __future__ import annotations

import asyncio

import pytest
import torch
from checkpoints import last_logits, save_checkpoint, save_judge_checkpoint
from metrics_scrape import delta, scrape
from serve_harness import RUNTIMES, async_client, running_app

from rmserve.serve.config.loading import load_config

TOL = 1e-5
PAIR_TEMPLATE = "<|user|>Question: {prompt} Answer A: {response_a} Answer B: {response_b} Better?</s><|assistant|>"
QUERY = "<|user|>Is this answer polite? Answer:"
ITEMS = [" Gladly!", " Go away.", " Owls hunt at night, and tea is brewed slowly in the evening.", ""]


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    return save_judge_checkpoint(tmp_path_factory.mktemp("judge"))


@pytest.fixture(scope="module", params=RUNTIMES)
def app(judge, tmp_path_factory, request):
    rm = save_checkpoint(tmp_path_factory.mktemp("rm"), "score")[0]
    config = load_config(
        base={
            "model": {"dtype": "fp32", "device": "cpu", "forward_overhead_tokens": 0},
            "models": [
                {"name": "judge", "path": str(judge[0]), "verdict_tokens": "A,B", "num_cpus": 0.5},
                {
                    "name": "pairwise",
                    "path": str(judge[0]),
                    "verdict_tokens": "A,B",
                    "verdict_pair_template": PAIR_TEMPLATE,
                    "num_cpus": 0.5,
                },
                {"name": "rm", "path": str(rm), "num_cpus": 0.5},
            ],
            "gateway_num_cpus": 0.25,
            "batching": {"batch_wait_timeout_s": 0.005},
        }
    )
    with running_app(config, request.param) as live:
        yield live


def reference(judge, ids: list[int], labels: list[int], apply_softmax: bool) -> list[float]:
    _, model, _ = judge
    logits = last_logits(model, ids)
    return (torch.softmax(logits[labels], -1) if apply_softmax else torch.softmax(logits, -1)[labels]).tolist()


def label_ids(tok) -> list[int]:
    return [tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B"), 7, len(tok) - 1]


@pytest.mark.parametrize("item_first", [False, True])
@pytest.mark.parametrize("apply_softmax", [False, True])
async def test_label_scores_equal_transformers(app, judge, apply_softmax, item_first):
    _, _, tok = judge
    labels = label_ids(tok)
    query_ids = tok(QUERY, add_special_tokens=False)["input_ids"]
    item_ids = [tok(text, add_special_tokens=False)["input_ids"] or [5] for text in ITEMS]
    common = {"model": "judge", "label_token_ids": labels, "apply_softmax": apply_softmax, "item_first": item_first}
    async with async_client(app) as client:
        as_text = await client.post("/v1/score", json={"query": QUERY, "items": ITEMS, **common})
        as_ids = await client.post("/v1/score", json={"query": query_ids, "items": item_ids, **common})
    assert as_text.status_code == 200, as_text.text
    assert as_ids.status_code == 200, as_ids.text
    body = as_text.json()
    assert (body["object"], body["model"], len(body["scores"])) == ("scoring", "judge", len(ITEMS))
    for got, text in zip(body["scores"], ITEMS, strict=True):
        joined = text + QUERY if item_first else QUERY + text
        assert got == pytest.approx(reference(judge, tok(joined)["input_ids"], labels, apply_softmax), abs=TOL)
    for got, ids in zip(as_ids.json()["scores"], item_ids, strict=True):
        joined = ids + query_ids if item_first else query_ids + ids
        assert got == pytest.approx(reference(judge, joined, labels, apply_softmax), abs=TOL)
    assert body["usage"]["prompt_tokens"] > 0


async def test_concurrent_requests_with_other_labels_get_their_own(app, judge):
    """The same text, other label ids (or the other normalisation) at once: no answer shared through duplicates, the
    reward cache or the prefix cache."""
    _, _, tok = judge
    ids = tok(QUERY + ITEMS[0])["input_ids"]
    cases = [
        (labels, softmax)
        for labels in ([3, 9], [9, 3], [3, 9, 11], [tok.convert_tokens_to_ids("A")])
        for softmax in (False, True)
    ]
    async with async_client(app) as client:
        responses = await asyncio.gather(
            *[
                client.post(
                    "/v1/score",
                    json={
                        "model": "judge",
                        "query": QUERY,
                        "items": [ITEMS[0]],
                        "label_token_ids": labels,
                        "apply_softmax": softmax,
                    },
                )
                for labels, softmax in cases * 3
            ]
        )
    for (labels, softmax), response in zip(cases * 3, responses, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["scores"] == [pytest.approx(reference(judge, ids, labels, softmax), abs=TOL)]


ERRORS = [
    ({"label_token_ids": [1, 2, 1_000_000]}, "label_token_ids[2]"),
    ({"label_token_ids": [1, -3]}, "label_token_ids[1]"),
    ({"label_token_ids": []}, "label_token_ids"),
    ({"model": "rm"}, "model"),
    ({"items": [[1, 2]]}, "items"),  # token ids after a text query
    ({"items": []}, "items"),
    ({"query": [4, 5], "items": [[6], [7, 1_000_000]]}, "items[1][1]"),
    ({"query": [4, 1_000_000], "items": [[6]], "item_first": True}, "query[1]"),
    ({"apply_softmax": "yes"}, "apply_softmax"),
]


@pytest.mark.parametrize(("change", "param"), ERRORS)
async def test_errors_name_the_callers_field(app, change, param):
    body = {"model": "judge", "query": QUERY, "items": ITEMS[:2], "label_token_ids": [1, 2], **change}
    async with async_client(app) as client:
        response = await client.post("/v1/score", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text


async def test_pairwise_judge_preference_is_the_verdict_of_one_templated_input(app, judge):
    _, _, tok = judge
    pairs = [
        {"prompt": "Tell me about owls.", "response_a": "Owls hunt at night.", "response_b": "Go away."},
        {"prompt": "Tea?", "response_a": "No.", "response_b": "Gladly, tea is brewed slowly."},
    ]
    verdicts = [tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")]
    async with async_client(app) as client:
        response = await client.post("/v1/preference", json={"model": "pairwise", "pairs": pairs})
        models = await client.get("/v1/models")
        pointwise = await client.post("/v1/preference", json={"model": "judge", "pairs": pairs})
    assert response.status_code == 200, response.text
    for result, pair in zip(response.json()["results"], pairs, strict=True):
        text = PAIR_TEMPLATE.format(**pair)
        want = reference(judge, tok(text)["input_ids"], verdicts, True)[0]
        assert result["prob_a"] == pytest.approx(want, abs=TOL) and result["reward_a"] == result["prob_a"]
        assert result["reward_b"] == pytest.approx(1 - want, abs=TOL)
        assert result["preferred"] == ("a" if want >= 0.5 else "b")
    assert [card.get("judge") for card in models.json()["data"]] == ["pointwise", "pairwise", None]
    assert pointwise.status_code == 200 and len(pointwise.json()["results"]) == 2  # a pointwise judge: Bradley–Terry


async def test_label_probabilities_stay_out_of_reward_telemetry(app):
    """A judge's label probabilities are not its rewards: reward telemetry counts its /v1/score items only."""
    body = {"model": "judge", "query": QUERY, "items": ITEMS, "label_token_ids": [1, 2]}
    async with async_client(app) as client:
        before = await scrape(client)
        labelled = await client.post("/v1/score", json=body)
        native = await client.post("/v1/score", json={"model": "judge", "items": [{"text": QUERY}]})
        after = await scrape(client)
    assert labelled.status_code == 200 and native.status_code == 200, labelled.text + native.text
    assert delta(before, after, "reward_items_total", model="judge") == 1


async def test_the_sdk_sends_the_label_scores_body_in_chunks_and_keeps_the_order(app, judge):
    """``AsyncRewardClient.label_scores`` (the sync client shares its call) equals the raw route, over 2-item chunks."""
    from rmserve.client import AsyncRewardClient

    labels = label_ids(judge[2])
    async with async_client(app) as client:
        raw = await client.post(
            "/v1/score", json={"model": "judge", "query": QUERY, "items": ITEMS, "label_token_ids": labels}
        )
    assert raw.status_code == 200, raw.text
    async with AsyncRewardClient(app.url, model="judge", max_items_per_request=2) as sdk:
        scores = await sdk.label_scores(QUERY, ITEMS, labels)
    assert len(scores) == len(ITEMS)
    for got, expected in zip(scores, raw.json()["scores"], strict=True):
        assert got == pytest.approx(expected, abs=TOL)
