"""Compatibility routes without Ray (request shapes, pad stripping, error naming) and the HTTP metrics middleware."""

from __future__ import annotations

import argparse
import asyncio

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from rmserve.model.errors import ContextLengthExceededError, InvalidRequestError, item_error
from rmserve.model.items import TextItem, TokensItem
from rmserve.serve.cli.flags import add_config_flags, overrides_from_args
from rmserve.serve.config.loading import ConfigError, load_config
from rmserve.serve.config.settings import ServerConfig
from rmserve.serve.edge.compat import strip_padding, with_status
from rmserve.serve.edge.compat_protocol import ClassifyRequest, GetRewardRequest
from rmserve.serve.edge.endpoints import VLLM_INVALID_STATUS
from rmserve.serve.edge.errors import validation_error
from rmserve.serve.edge.locations import in_groups, in_items, in_list, in_pairs
from rmserve.serve.metrics.instrumentation import RequestMetricsMiddleware
from rmserve.serve.metrics.store import MetricsRecorder


@pytest.mark.parametrize(
    ("text", "pad", "expected"),
    [
        ("<pad><pad><s>Q: hi A: yo</s>", "<pad>", "<s>Q: hi A: yo</s>"),
        ("<s>Q: hi A: yo</s><pad><pad><pad>", "<pad>", "<s>Q: hi A: yo</s>"),
        ("<pad><s>a<pad>b</s><pad>", "<pad>", "<s>a<pad>b</s>"),  # only the ends
        ("<pad><pad>", "<pad>", ""),
        ("<s>text</s>", None, "<s>text</s>"),
        ("<pad>text", "", "<pad>text"),
        ("[PAD][PAD]x[PAD]", "[PAD]", "x"),
    ],
)
def test_strip_padding(text, pad, expected):
    assert strip_padding(text, pad) == expected


def test_get_reward_request_accepts_openrlhf_bodies_and_ignores_extra_fields():
    body = {"query": ["<s>a</s>", "<s>b</s>"], "prompts": ["a", "b"], "labels": ["x", None], "step": 3}
    request = GetRewardRequest.model_validate(body)
    assert request.query == ["<s>a</s>", "<s>b</s>"]
    assert not hasattr(request, "step")
    assert GetRewardRequest.model_validate({"query": [], "prompts": [], "labels": []}).query == []  # an empty shard
    for bad in ({"query": "<s>a</s>"}, {"query": [1]}, {}):
        with pytest.raises(ValidationError):
            GetRewardRequest.model_validate(bad)


def test_classify_request_shapes_and_activation_default():
    one = ClassifyRequest.model_validate({"input": "t", "model": "m", "add_special_tokens": False, "priority": 0})
    assert one.items() == [TextItem(text="t")] and one.model == "m" and one.single()
    assert one.apply_activation() is True  # vLLM's default for classify
    two = ClassifyRequest.model_validate({"input": ["a", "b"], "use_activation": False})
    assert two.items() == [TextItem(text="a"), TextItem(text="b")] and not two.single()
    assert ClassifyRequest.model_validate({"input": "a", "use_activation": False}).apply_activation() is False
    assert ClassifyRequest.model_validate({"input": "a", "activation": False}).apply_activation() is False
    both = ClassifyRequest.model_validate({"input": "a", "activation": False, "use_activation": True})
    assert both.apply_activation() is True
    assert ClassifyRequest.model_validate({"input": []}).items() == []  # an empty shard
    bad_bodies = [{"input": 3}, {"input": ["a", 2]}, {"input": [[1], []]}, {"input": "a", "use_activation": "no"}, {}]
    for bad in bad_bodies:
        with pytest.raises(ValidationError):
            ClassifyRequest.model_validate(bad)


def test_classify_accepts_token_ids_as_vllm_does():
    one = ClassifyRequest.model_validate({"input": [1, 15, 29]})
    assert one.items() == [TokensItem(input_ids=[1, 15, 29])] and one.single()
    many = ClassifyRequest.model_validate({"input": [[1, 15], [1, 7, 9]]})
    assert many.items() == [TokensItem(input_ids=[1, 15]), TokensItem(input_ids=[1, 7, 9])] and not many.single()


@pytest.mark.parametrize(
    ("locate", "index", "field", "param"),
    [
        (in_items, 3, "prompt[0].role", "items[3].prompt[0].role"),
        (in_items, 1, None, "items[1]"),
        (in_pairs, 2, "response", "pairs[1].response_a"),
        (in_pairs, 3, "response", "pairs[1].response_b"),
        (in_pairs, 3, None, "pairs[1].response_b"),
        (in_pairs, 5, "prompt[1].role", "pairs[2].prompt[1].role"),
        (in_groups([2, 5]), 1, "response", "groups[0].responses[1]"),
        (in_groups([2, 5]), 5, "response", "groups[1].responses[3]"),
        (in_groups([2, 5]), 6, "prompt", "groups[1].prompt"),
        (in_list("query", single=False), 5, "text", "query[5]"),
        (in_list("input", single=False), 2, None, "input[2]"),
        (in_list("input", single=True), 0, "text", "input"),
        (in_list("input", single=True), 0, "input_ids[4]", "input[4]"),
        (in_list("input", single=False), 1, "input_ids[4]", "input[1][4]"),
    ],
)
def test_item_errors_name_the_callers_own_field(locate, index, field, param):
    err = item_error(InvalidRequestError, index, "something is wrong", field=field)
    assert err.relocate(locate(err.index, err.field)) is err
    assert (err.param, err.message, str(err)) == (param, f"{param}: something is wrong", f"{param}: something is wrong")


def test_item_errors_keep_their_location_across_processes():
    import pickle

    err = pickle.loads(pickle.dumps(item_error(ContextLengthExceededError, 4, "too long")))
    assert (type(err), err.index, err.field, err.detail, err.status) == (
        ContextLengthExceededError,
        4,
        None,
        "too long",
        400,
    )
    assert err.relocate(in_pairs(err.index, err.field)).param == "pairs[2].response_a"


def test_classify_validation_errors_are_400_as_in_vllm():
    with pytest.raises(ValidationError) as info:
        ClassifyRequest.model_validate({"input": ["a", 2]})
    err = with_status(VLLM_INVALID_STATUS)(validation_error(info.value))
    assert err.status == 400 and err.type == "invalid_request" and err.param == "input[1]"
    with pytest.raises(ValidationError) as info:
        GetRewardRequest.model_validate({"query": ["a", 2]})
    err = validation_error(info.value)
    assert err.status == 422 and err.param == "query[1]"  # /get_reward answers as the native routes do


async def test_request_metrics_middleware_labels_route_templates_and_statuses():
    app = FastAPI()
    recorder = MetricsRecorder()
    app.add_middleware(RequestMetricsMiddleware, recorder=recorder)

    @app.post("/v1/score")
    async def score() -> JSONResponse:
        return JSONResponse({"ok": True})

    @app.get("/boom")
    async def boom() -> JSONResponse:
        raise RuntimeError("bug")

    @app.get("/gone")
    async def gone() -> JSONResponse:
        raise asyncio.CancelledError  # what the server does to a handler whose client went away

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.post("/v1/score")).status_code == 200
        assert (await client.post("/v1/score")).status_code == 200
        assert (await client.get("/v1/score")).status_code == 405
        assert (await client.get("/random/path/123")).status_code == 404
        assert (await client.get("/boom")).status_code == 500
        with pytest.raises(asyncio.CancelledError):
            await client.get("/gone")
    snap = recorder.snapshot()
    assert snap.get("requests", route="/v1/score", status="200") == 2.0
    assert snap.get("requests", route="/v1/score", status="405") == 1.0
    assert snap.get("requests", route="other", status="404") == 1.0
    assert snap.get("requests", route="/boom", status="500") == 1.0
    assert snap.get("requests", route="/gone", status="499") == 1.0  # client closed request: not a 5xx
    assert snap.get("requests", route="/gone", status="500") == 0.0
    assert snap.histogram("request_duration_seconds", route="/v1/score").count == 3


def test_compat_normalize_setting_from_every_source(tmp_path):
    assert ServerConfig().compat.normalize is False
    path = tmp_path / "server.yaml"
    path.write_text("compat:\n  normalize: true\n")
    assert load_config(yaml_path=path).compat.normalize is True
    assert load_config(environ={"RMSERVE_COMPAT__NORMALIZE": "true"}).compat.normalize is True
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    assert overrides_from_args(parser.parse_args(["--compat-normalize"])) == {"compat": {"normalize": True}}
    cli_off = overrides_from_args(parser.parse_args(["--no-compat-normalize"]))
    assert load_config(yaml_path=path, overrides=cli_off).compat.normalize is False  # the CLI wins
    with pytest.raises(ConfigError, match="unknown key 'compat.normalise'.*known keys here: normalize"):
        load_config(base={"compat": {"normalise": True}})
