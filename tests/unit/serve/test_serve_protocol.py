"""Request validation of the native routes and the pure response-building steps (no Ray, no HTTP)."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from rmserve.model.errors import InvalidRequestError
from rmserve.model.items import ConversationItem, PairItem, TokensItem
from rmserve.serve.edge.errors import validation_error
from rmserve.serve.edge.native import preference_result, rank_group, sigmoid
from rmserve.serve.edge.protocol import PreferenceRequest, RerankRequest, ScoreRequest
from rmserve.serve.edge.routes import parse_json


def rejection(model, body) -> tuple[int, str, str | None]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    err = validation_error(info.value)
    return err.status, err.message, err.param


def test_each_item_form_is_recognised_by_its_keys():
    request = ScoreRequest.model_validate({"items": [{"prompt": [{"role": "user", "content": "q"}], "response": "a"}]})
    assert isinstance(request.items[0], PairItem)
    request = ScoreRequest.model_validate({"items": [{"messages": [{"role": "assistant", "content": "a"}]}]})
    assert isinstance(request.items[0], ConversationItem)
    request = ScoreRequest.model_validate({"items": [{"input_ids": [1, 2]}], "normalize": True, "model": "m"})
    assert isinstance(request.items[0], TokensItem) and request.normalize and request.model == "m"


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        ({"items": []}, "items: List should have at least 1 item", "items"),
        ({"items": [{"prompt": "q"}]}, "items[0].response: Field required", "items[0].response"),
        ({"items": [{"text": "t", "prompt": "q"}]}, "items[0].prompt: Extra inputs are not permitted", None),
        ({"items": [{"foo": 1}]}, "items[0]: an item is exactly one of", "items[0]"),
        ({"items": ["just a string"]}, "items[0]: an item is exactly one of", "items[0]"),
        ({"items": [{"prompt": 5, "response": "r"}]}, "items[0].prompt: Input should be a valid string", None),
        (
            {"items": [{"prompt": [{"role": "user"}], "response": "r"}]},
            "items[0].prompt[0].content: content is required",
            None,
        ),
        ({"items": [{"input_ids": [1, 2.5]}]}, "items[0].input_ids[1]: Input should be a valid integer", None),
        ({"items": [{"input_ids": []}]}, "items[0].input_ids: List should have at least 1 item", None),
        ({"items": [{"text": "a"}], "extra": 1}, "extra: Extra inputs are not permitted", "extra"),
        ({"items": [{"text": "a"}], "normalize": "yes"}, "normalize: Input should be a valid boolean", None),
        ([{"text": "a"}], "the request body must be a JSON object", None),
    ],
)
def test_invalid_score_requests_are_422_naming_the_field(body, message, param):
    status, got, got_param = rejection(ScoreRequest, body)
    assert status == 422
    assert got.startswith(message), got
    if param is not None:
        assert got_param == param


def test_mixed_item_forms_are_rejected():
    status, message, _ = rejection(ScoreRequest, {"items": [{"prompt": "q", "response": "r"}, {"text": "t"}]})
    assert status == 422
    assert "items mix forms (items[0] is pair, items[1] is text)" in message


@pytest.mark.parametrize(
    ("model", "body", "message"),
    [
        (PreferenceRequest, {"pairs": []}, "pairs: List should have at least 1 item"),
        (PreferenceRequest, {"pairs": [{"prompt": "q", "response_a": "a"}]}, "pairs[0].response_b: Field required"),
        (RerankRequest, {"groups": [{"prompt": "q", "responses": []}]}, "groups[0].responses: List should have"),
        (RerankRequest, {"groups": [{"prompt": "q", "responses": ["a"]}], "top_k": 0}, "top_k: Input should be"),
        (RerankRequest, {"groups": [{"prompt": "q", "responses": ["a"]}], "top_k": "2"}, "top_k: Input should be"),
    ],
)
def test_invalid_preference_and_rerank_requests(model, body, message):
    status, got, _ = rejection(model, body)
    assert status == 422 and got.startswith(message), got


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "the request body is empty"),
        (b"{bad", "malformed JSON: Expecting property name"),
        (b'{"x": NaN}', "NaN is not a JSON number"),
        (b'{"x": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"x": "\xff\xfe\xfa"}', "not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_malformed_json_is_422(raw, message):
    with pytest.raises(InvalidRequestError) as info:
        parse_json(raw)
    assert info.value.status == 422 and message in info.value.message


def test_parse_json_accepts_utf8_and_huge_numbers():
    assert parse_json('{"t": "héllo"}'.encode()) == {"t": "héllo"}
    assert parse_json(json.dumps({"n": 10**30}).encode()) == {"n": 10**30}


def test_preference_is_bradley_terry_on_raw_rewards():
    result = preference_result(raw_a=2.0, raw_b=0.5, shown_a=0.25, shown_b=-0.5)
    assert result.prob_a == pytest.approx(1 / (1 + math.exp(-1.5)), abs=1e-12)
    assert (result.reward_a, result.reward_b, result.preferred) == (0.25, -0.5, "a")
    assert preference_result(1.0, 3.0, 1.0, 3.0).preferred == "b"
    tie = preference_result(1.0, 1.0, 1.0, 1.0)
    assert tie.preferred == "a" and tie.prob_a == 0.5


def test_sigmoid_is_stable_at_extremes():
    assert sigmoid(1000.0) == 1.0 and sigmoid(-1000.0) == 0.0
    assert sigmoid(-30.0) == pytest.approx(math.exp(-30.0), rel=1e-9)


def test_rank_group_is_stable_descending_and_cut_to_top_k():
    rewards = [0.5, 2.0, 0.5, -1.0, 2.0]
    full = rank_group(rewards, None)
    assert [r.index for r in full.ranking] == [1, 4, 0, 2, 3]  # ties keep input order
    assert [r.reward for r in full.ranking] == [2.0, 2.0, 0.5, 0.5, -1.0]
    assert full.best_index == 1
    top = rank_group(rewards, 2)
    assert [r.index for r in top.ranking] == [1, 4] and top.best_index == 1
    assert len(rank_group(rewards, 10**9).ranking) == 5
