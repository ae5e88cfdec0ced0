"""Compatibility routes without Ray (request shapes, pad stripping, error naming) and the HTTP metrics middleware."""

from __future__ import annotations

import argparse

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from rmserve.model.errors import InvalidRequestError, RequestTooLargeError, item_error
from rmserve.serve.cli_flags import add_config_flags, overrides_from_args
from rmserve.serve.compat import classify_error, get_reward_error, strip_padding
from rmserve.serve.compat_protocol import ClassifyRequest, GetRewardRequest
from rmserve.serve.config import ServerConfig
from rmserve.serve.config_loading import ConfigError, load_config
from rmserve.serve.errors import validation_error
from rmserve.serve.instrumentation import RequestMetricsMiddleware
from rmserve.serve.metrics import MetricsRecorder


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
    for bad in ({"query": []}, {"query": "<s>a</s>"}, {"query": [1]}, {}):
        with pytest.raises(ValidationError):
            GetRewardRequest.model_validate(bad)


def test_classify_request_shapes_and_activation_default():
    one = ClassifyRequest.model_validate({"input": "t", "model": "m", "add_special_tokens": False, "priority": 0})
    assert one.texts() == ["t"] and one.model == "m"
    assert one.apply_activation() is True  # vLLM's default for classify
    assert ClassifyRequest.model_validate({"input": ["a", "b"], "use_activation": False}).texts() == ["a", "b"]
    assert ClassifyRequest.model_validate({"input": "a", "use_activation": False}).apply_activation() is False
    assert ClassifyRequest.model_validate({"input": "a", "activation": False}).apply_activation() is False
    both = ClassifyRequest.model_validate({"input": "a", "activation": False, "use_activation": True})
    assert both.apply_activation() is True
    for bad in ({"input": []}, {"input": 3}, {"input": ["a", 2]}, {"input": "a", "use_activation": "no"}, {}):
        with pytest.raises(ValidationError):
            ClassifyRequest.model_validate(bad)


def test_item_errors_name_the_compat_field():
    err = get_reward_error(item_error(InvalidRequestError, 2, "text is empty", field="text"))
    assert (err.param, err.message, err.status) == ("query[2]", "query[2]: text is empty", 400)
    err = classify_error(item_error(InvalidRequestError, 1, "text is empty", field="text"))
    assert (err.param, err.message) == ("input[1]", "input[1]: text is empty")
    err = classify_error(item_error(InvalidRequestError, 0, "text is empty", field="text"), single_input=True)
    assert (err.param, err.message) == ("input", "input: text is empty")
    untouched = get_reward_error(RequestTooLargeError("9 items exceed the limit of 8 per request"))
    assert (untouched.param, untouched.status) == (None, 413)


def test_classify_validation_errors_are_400_as_in_vllm():
    with pytest.raises(ValidationError) as info:
        ClassifyRequest.model_validate({"input": ["a", 2]})
    err = classify_error(validation_error(info.value))
    assert err.status == 400 and err.type == "invalid_request" and err.param == "input[1]"
    with pytest.raises(ValidationError) as info:
        GetRewardRequest.model_validate({"query": ["a", 2]})
    err = get_reward_error(validation_error(info.value))
    assert err.status == 422 and err.param == "query[1]"


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

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.post("/v1/score")).status_code == 200
        assert (await client.post("/v1/score")).status_code == 200
        assert (await client.get("/v1/score")).status_code == 405
        assert (await client.get("/random/path/123")).status_code == 404
        assert (await client.get("/boom")).status_code == 500
    snap = recorder.snapshot()
    assert snap.get("requests", route="/v1/score", status="200") == 2.0
    assert snap.get("requests", route="/v1/score", status="405") == 1.0
    assert snap.get("requests", route="other", status="404") == 1.0
    assert snap.get("requests", route="/boom", status="500") == 1.0
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
