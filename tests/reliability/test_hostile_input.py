"""Issue 7.5 — hostile input: every route (native and compatibility) is fuzzed from the app's own OpenAPI
document with schemathesis (valid and invalid data), then hit with hand-written nasty requests. Zero 5xx,
every 4xx carries API.md's JSON error body, the server stays up. A reward that comes out NaN or infinite is
never returned as a number: a checkpoint whose embedding of one token is NaN, and a normalisation whose std
underflows, are served and their requests fail cleanly (500 ``internal``, JSON body) without harming others.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections import Counter

import httpx
import hypothesis
import pytest
import schemathesis
from reliability_harness import TOL, app_config, deployed, offline_model, routes
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from rmserve.model.errors import InternalError

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

NATIVE_ROUTES = ("/v1/score", "/score", "/v1/preference", "/v1/rerank")
COMPAT_ROUTES = ("/get_reward", "/classify", "/v1/embeddings", "/slime/reward", "/rerank")
TAKES_ONE_STRING = ("/classify", "/v1/embeddings", "/slime/reward")  # the main field may be one text
TAKES_TOKEN_IDS = ("/classify", "/v1/embeddings")
EMPTY_LIST_OK = ("/get_reward", "/classify", "/v1/embeddings", "/rerank")
SCORING_ROUTES = NATIVE_ROUTES + COMPAT_ROUTES
ERROR_TYPES = {
    "invalid_request",
    "context_length_exceeded",
    "request_too_large",
    "unauthorized",
    "overloaded",
    "not_ready",
    "sleeping",
    "timeout",
    "internal",
}
FUZZ_EXAMPLES = [60, pytest.param(500, marks=pytest.mark.slow)]  # per operation and mode
POISON_WORD = "owls"  # its token's embedding is NaN in the poisoned checkpoint
POISON_PREFIX = "/poisoned"


@pytest.fixture(scope="module")
def app(plain_app):
    return plain_app


@pytest.fixture
async def client(app):
    async with app.client() as c:
        yield c


def assert_clean(response: httpx.Response, allowed: set[int] | None = None) -> None:
    """No 5xx; a 4xx has API.md's error body with a known type and its own status as code."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if allowed is not None:
        assert response.status_code in allowed, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/json"), response.headers
        body = response.json()
        assert set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "code", "param"}, error
        assert error["type"] in ERROR_TYPES and error["code"] == response.status_code, error
        assert isinstance(error["message"], str) and error["message"]
        assert error["param"] is None or isinstance(error["param"], str)


# -- schemathesis: every documented operation, valid and invalid data --------------------------------------
# Driven through hypothesis directly (``operation.as_strategy``): schemathesis' lazy pytest loader does not work
# with pytest 9, and the app's URL is only known once the module's fixture has deployed it.
OPERATIONS = [("POST", route) for route in SCORING_ROUTES] + [
    ("GET", path) for path in ("/health", "/ready", "/v1/models", "/metrics")
]
FUZZ_CASES: Counter[str] = Counter()


@pytest.mark.parametrize("examples", FUZZ_EXAMPLES)
@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz_every_route_from_the_openapi_schema(app, method, path, mode, examples, figures):
    schema = schemathesis.openapi.from_url(app.url + "/openapi.json")
    if method == "GET" and mode == "negative":
        pytest.skip("a GET without parameters has no invalid variant")
    operation = schema[path][method]
    statuses: Counter[int] = Counter()

    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,  # the same cases on every run: a failure reproduces
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=operation.as_strategy(GenerationMode(mode)))
    def fuzz(case) -> None:
        response = case.call(base_url=app.url, timeout=120)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=[not_a_server_error])
        headers = [(name, value) for name, values in response.headers.items() for value in values]
        assert_clean(httpx.Response(response.status_code, headers=headers, content=response.content))

    fuzz()
    FUZZ_CASES.update({f"{method} {path} {mode} {status}": n for status, n in statuses.items()})
    FUZZ_CASES["total"] += sum(statuses.values())
    figures.record(
        "hostile input (schemathesis)", cases=FUZZ_CASES["total"], by_operation=dict(sorted(FUZZ_CASES.items()))
    )
    assert sum(statuses.values()) > 0


async def test_openapi_documents_every_scoring_route(client):
    assert set(SCORING_ROUTES) <= await routes(client)


# -- hand-written nasty requests -------------------------------------------------------------------------------
def body_with_text(route: str, text: str) -> dict:
    """A valid body for ``route`` whose main string is ``text``."""
    if route in ("/v1/score", "/score"):
        return {"items": [{"prompt": "Tell me about tea.", "response": text}]}
    if route == "/v1/preference":
        return {"pairs": [{"prompt": text, "response_a": "Tea is nice.", "response_b": "No."}]}
    if route == "/v1/rerank":
        return {"groups": [{"prompt": "Tell me about tea.", "responses": [text, "Tea."]}]}
    if route == "/get_reward":
        return {"query": [text]}
    if route == "/slime/reward":
        return {"prompt": "Tell me about tea.", "response": text, "label": None}
    if route == "/rerank":
        return {"query": "Tell me about tea.", "documents": [text, {"text": "Tea."}]}
    return {"input": [text], "use_activation": False}


def raw_cases(route: str) -> list[tuple[str, bytes, set[int]]]:
    """(label, raw body, allowed statuses) for every route."""
    nested = b"[" * 100_000 + b"]" * 100_000
    return [
        ("invalid UTF-8", b'{"items": [{"text": "\xff\xfe\xfd"}]}', {400, 422}),
        ("invalid UTF-8 in a compat body", b'{"query": ["\xc3\x28"], "input": "\xed\xa0\x80"}', {400, 422}),
        ("truncated JSON", b'{"items": [{"text": "a"', {400, 422}),
        ("empty body", b"", {400, 422}),
        ("whitespace body", b"   \n", {400, 422}),
        ("JSON null", b"null", {400, 422}),
        ("JSON array", b"[1, 2, 3]", {400, 422}),
        ("JSON string", b'"items"', {400, 422}),
        ("JSON number", b"12345", {400, 422}),
        ("deeply nested array", nested, {400, 422}),
        ("deeply nested object", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, {400, 422}),
        ("NaN literal", b'{"items": [{"input_ids": [NaN]}], "query": [NaN], "input": NaN}', {400, 422}),
        ("Infinity literal", b'{"items": [{"input_ids": [Infinity]}], "query": ["a"], "input": -Infinity}', {400, 422}),
        ("NaN in top_k", b'{"groups": [{"prompt": "a", "responses": ["b"]}], "top_k": NaN}', {400, 422}),
        ("huge exponent", b'{"items": [{"input_ids": [1e400]}], "query": [1e400], "input": 1e400}', {400, 422}),
        (
            "5,000-digit integer",
            b'{"items": [{"input_ids": [' + b"9" * 5000 + b']}], "top_k": ' + b"9" * 5000 + b"}",
            {400, 422},
        ),
        ("duplicate keys", b'{"items": [], "items": 3, "query": [], "query": 3}', {400, 422}),
        ("NUL bytes", b'{"items": [{"text": "a\\u0000b"}]\x00}', {400, 422}),
        ("BOM before JSON", b"\xef\xbb\xbf" + json.dumps(body_with_text(route, "a")).encode(), {200, 400}),
    ]


def json_cases(route: str) -> list[tuple[str, object, set[int]]]:
    """(label, JSON value, allowed statuses) for ``route``; the compat routes ignore unknown fields."""
    native = route in NATIVE_ROUTES
    bad = {400, 422}
    # OpenRLHF's and slime's bodies have no model field: an unknown field, ignored
    ignores_model = route in ("/get_reward", "/slime/reward")
    cases: list[tuple[str, object, set[int]]] = [
        ("empty object", {}, bad),
        ("unknown field only", {"itemz": [{"text": "a"}]}, bad),
        ("wrong type: number for the list", _replace_main(route, 42), bad),
        (
            "wrong type: string for the list",
            _replace_main(route, "not a list"),
            {200} if route in TAKES_ONE_STRING else bad,
        ),
        ("wrong type: object for the list", _replace_main(route, {"a": 1}), bad),
        # /classify takes token ids, as vLLM does
        ("wrong type: list of numbers", _replace_main(route, [1, 2, 3]), {200} if route in TAKES_TOKEN_IDS else bad),
        ("wrong type: list of nulls", _replace_main(route, [None]), bad),
        ("empty list", _replace_main(route, []), {200} if route in EMPTY_LIST_OK else bad),
        ("lone surrogate", body_with_text(route, "\ud800 broken"), {200, 400, 422}),
        ("control characters", body_with_text(route, "a\u0000\u0001\u001f\u007f\u2028b"), {200}),
        ("only whitespace", body_with_text(route, " \n\t "), {200}),
        ("empty string", body_with_text(route, ""), {200, 400, 422}),
        ("unknown extra field", {**body_with_text(route, "Tea."), "temperature": 0.7}, {422} if native else {200}),
        ("model of the wrong type", {**body_with_text(route, "Tea."), "model": 7}, {200} if ignores_model else bad),
        (
            "model unknown",
            {**body_with_text(route, "Tea."), "model": "x" * 10_000},
            {200} if ignores_model else {400, 404},
        ),
    ]
    if route in ("/v1/score", "/score"):
        cases += [
            ("negative token id", {"items": [{"input_ids": [1, -1, 5]}]}, {400, 422}),
            ("token id = vocab size", {"items": [{"input_ids": [1, 704]}]}, {400, 422}),
            ("token id 2**63", {"items": [{"input_ids": [2**63]}]}, {400, 422}),
            ("token id 10**30", {"items": [{"input_ids": [10**30]}]}, {400, 422}),
            ("token ids as strings", {"items": [{"input_ids": ["1", "2"]}]}, {400, 422}),
            ("token ids as floats", {"items": [{"input_ids": [1.0, 2.5]}]}, {400, 422}),
            ("token ids as bools", {"items": [{"input_ids": [True, False]}]}, {400, 422}),
            ("empty token list", {"items": [{"input_ids": []}]}, {400, 422}),
            ("100,000 token ids", {"items": [{"input_ids": [5] * 100_000}]}, {200, 400}),
            ("mixed item forms", {"items": [{"text": "a"}, {"input_ids": [1, 5]}]}, {400, 422}),
            ("two forms in one item", {"items": [{"text": "a", "input_ids": [1]}]}, {400, 422}),
            ("normalize as string", {"items": [{"text": "a"}], "normalize": "yes"}, {400, 422}),
            ("normalize without normalisation", {"items": [{"text": "a"}], "normalize": True}, {400, 422}),
            ("empty messages", {"items": [{"messages": []}]}, {400, 422}),
            ("last message not assistant", {"items": [{"messages": [{"role": "user", "content": "a"}]}]}, {400, 422}),
            ("unknown role", {"items": [{"messages": [{"role": "wizard", "content": "a"}]}]}, {400, 422}),
            ("message content as list", {"items": [{"messages": [{"role": "assistant", "content": [1]}]}]}, {400, 422}),
            ("prompt as empty list", {"items": [{"prompt": [], "response": "a"}]}, {400, 422}),
            ("items as a huge list of nulls", {"items": [None] * 50_000}, {400, 413, 422}),
        ]
    if route == "/v1/rerank":
        group = {"prompt": "Tell me about tea.", "responses": ["Tea is nice.", "No.", "Tea!"]}
        cases += [
            ("top_k 0", {"groups": [group], "top_k": 0}, {400, 422}),
            ("top_k negative", {"groups": [group], "top_k": -5}, {400, 422}),
            ("top_k 10**18", {"groups": [group], "top_k": 10**18}, {200}),
            ("top_k 10**100", {"groups": [group], "top_k": 10**100}, {200, 400, 422}),
            ("top_k as float", {"groups": [group], "top_k": 1.5}, {400, 422}),
            ("top_k 1e308", {"groups": [group], "top_k": 1e308}, {400, 422}),
            ("top_k as string", {"groups": [group], "top_k": "3"}, {400, 422}),
            ("empty responses", {"groups": [{"prompt": "a", "responses": []}]}, {400, 422}),
        ]
    if route == "/classify":
        cases += [
            ("use_activation as string", {"input": "a", "use_activation": "no"}, {400, 422}),
            ("input as list of lists", {"input": [["a"]]}, {400, 422}),
            ("input empty string", {"input": ""}, {200, 400, 422}),
        ]
    if route == "/get_reward":
        cases += [("prompts and labels of any shape", {"query": ["a"], "prompts": {"x": [1]}, "labels": 5}, {200})]
    if route == "/slime/reward":
        cases += [
            ("label of any shape", {"prompt": "a", "response": "b", "label": {"x": [1, None]}}, {200}),
            ("prompt as messages", {"prompt": [{"role": "user", "content": "a"}], "response": "b"}, {200}),
            ("prompt with an unknown role", {"prompt": [{"role": "wizard", "content": "a"}], "response": "b"}, bad),
        ]
    if route == "/rerank":
        cases += [
            ("top_n 0", {"query": "a", "documents": ["b"], "top_n": 0}, bad),
            ("top_n 10**18", {"query": "a", "documents": ["b", "c"], "top_n": 10**18}, {200}),
            ("document object without text", {"query": "a", "documents": [{"title": "b"}]}, bad),
            ("query missing", {"documents": ["b"]}, bad),
        ]
    return cases


def _replace_main(route: str, value: object) -> dict:
    if route == "/slime/reward":
        return {"prompt": "Tell me about tea.", "response": value}
    if route == "/rerank":
        return {"query": "Tell me about tea.", "documents": value}
    key = {
        "/v1/preference": "pairs",
        "/v1/rerank": "groups",
        "/get_reward": "query",
        "/classify": "input",
        "/v1/embeddings": "input",
    }
    return {key.get(route, "items"): value}


@pytest.mark.parametrize("route", SCORING_ROUTES)
async def test_hand_written_hostile_requests(app, client, route, figures):
    cases = [(label, raw, allowed) for label, raw, allowed in raw_cases(route)]
    cases += [(label, json.dumps(body).encode(), allowed) for label, body, allowed in json_cases(route)]
    failures = []
    for label, raw, allowed in cases:
        response = await client.post(route, content=raw, headers={"content-type": "application/json"})
        try:
            assert_clean(response, allowed)
        except AssertionError as exc:
            failures.append(f"{label}: {exc}")
    tried = len(cases)
    assert not failures, "\n".join(failures)
    figures.record("hostile input (hand-written)", **{route: tried})
    assert (await client.get("/health")).status_code == 200


# Each 10 MB string takes the replica's tokenizer thread 5-20 s on this machine: CI sends one per family of routes.
TEN_MB_ROUTES = [
    r if r in ("/v1/score", "/get_reward") else pytest.param(r, marks=pytest.mark.slow) for r in SCORING_ROUTES
]


@pytest.mark.parametrize("route", TEN_MB_ROUTES)
async def test_ten_megabyte_strings(app, client, route, figures):
    text = "Tea is lovely. " * (10 * 2**20 // 15)
    started = time.perf_counter()
    big = asyncio.ensure_future(client.post(route, json=body_with_text(route, text)))
    await asyncio.sleep(0.5)
    small_started = time.perf_counter()
    small = await client.post("/v1/score", json={"items": [{"text": "Tea."}]})
    small_s = time.perf_counter() - small_started
    response = await big
    big_s = time.perf_counter() - started
    assert_clean(response, {200, 400, 413})
    if response.status_code == 200 and route in NATIVE_ROUTES[:2]:
        assert response.json()["truncated"] == [0]  # left-truncated to max_length, scored
    # The server stays up, and a small request sent meanwhile is answered (after the big one's tokenization).
    assert small.status_code == 200, small.text
    figures.record(
        "hostile input (10 MB strings)",
        **{
            route: {
                "status": response.status_code,
                "seconds": round(big_s, 1),
                "small_request_meanwhile_s": round(small_s, 1),
            }
        },
    )


@pytest.mark.parametrize("route", SCORING_ROUTES)
async def test_wrong_method_and_content_type(client, route):
    response = await client.get(route)
    assert_clean(response, {405})
    assert "POST" in response.headers.get("allow", "")
    for content_type, raw in [
        ("text/plain", json.dumps(body_with_text(route, "Tea.")).encode()),
        ("application/x-www-form-urlencoded", b"items=1&query=2"),
        (
            "multipart/form-data; boundary=xyz",
            b"--xyz\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--xyz--\r\n",
        ),
        ("application/xml", b"<items><text>a</text></items>"),
    ]:
        response = await client.post(route, content=raw, headers={"content-type": content_type})
        assert_clean(response, {200, 400, 415, 422})


async def test_server_stays_up_and_correct_after_the_abuse(app, client):
    items = [{"prompt": "Tell me about tea.", "response": "Gladly! Tea has a long history."}]
    response = await client.post("/v1/score", json={"items": items})
    assert response.status_code == 200
    assert response.json()["rewards"] == pytest.approx(offline_model(app.config.model_spec()).score(items), abs=TOL)
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/ready")).status_code == 200


# -- non-finite rewards ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def poisoned_model_dir(demo_model_dir, tmp_path_factory):
    """The demo checkpoint with the embedding of one word's token set to NaN: every item containing that word
    gets a NaN reward from the model, every other item its normal reward."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("poisoned-rm")
    shutil.copytree(demo_model_dir, out, dirs_exist_ok=True)
    token_ids = AutoTokenizer.from_pretrained(str(out))(f" {POISON_WORD}", add_special_tokens=False)["input_ids"]
    assert len(token_ids) == 1, token_ids
    weights = load_file(str(out / "model.safetensors"))
    weights["model.embed_tokens.weight"][token_ids[0]] = torch.nan
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def poisoned_app(app, serve_instance, poisoned_model_dir):
    # reward_std underflows: every normalised reward (r - 0) / 5e-324 overflows to +-inf.
    config = app_config(poisoned_model_dir, "rel-poisoned", model={"reward_mean": 0.0, "reward_std": 5e-324})
    with deployed(serve_instance, config, prefix=POISON_PREFIX) as live:
        yield live


def strict_json(response: httpx.Response) -> object:
    """The body parsed as strict JSON: a NaN/Infinity literal fails the test."""

    def reject(name: str) -> None:
        raise AssertionError(f"non-finite number {name} in the response body: {response.text[:300]}")

    return json.loads(response.content, parse_constant=reject)


async def test_nan_rewards_are_never_returned_as_numbers(poisoned_app):
    poisoned = f"Tell me about {POISON_WORD}. They are birds."
    clean = "Tell me about tea. It is a drink."
    offline = offline_model(poisoned_app.config.model_spec())
    outcome = offline.engine.score_batch([offline.tokenize({"text": poisoned}).input_ids])[0]
    assert isinstance(outcome, InternalError) and "non-finite" in str(outcome), outcome  # the checkpoint is poisoned
    for route in SCORING_ROUTES:
        async with poisoned_app.client() as client:
            bad, good = await asyncio.gather(
                client.post(route, json=body_with_text(route, poisoned)),
                client.post(route, json=body_with_text(route, clean)),
            )
        assert bad.status_code == 500, (route, bad.text)
        assert_clean_500(bad)
        assert good.status_code == 200, (route, good.text)
        strict_json(good)


async def test_infinite_normalised_rewards_are_never_returned_as_numbers(poisoned_app):
    items = [{"prompt": "Tell me about tea.", "response": "Gladly! Tea has a long history."}]
    async with poisoned_app.client() as client:
        raw = await client.post("/v1/score", json={"items": items})
        normalised = [await client.post(route, json=body) for route, body in normalised_requests(items)]
    assert raw.status_code == 200 and strict_json(raw)["rewards"][0] != 0.0  # finite raw, infinite normalised
    for response in normalised:
        assert response.status_code == 500, response.text
        assert_clean_500(response)


def normalised_requests(items: list[dict]) -> list[tuple[str, dict]]:
    return [
        ("/v1/score", {"items": items, "normalize": True}),
        ("/v1/rerank", {"groups": [{"prompt": "Tell me about tea.", "responses": ["Tea!", "No."]}], "normalize": True}),
        (
            "/v1/preference",
            {"pairs": [{"prompt": "Tea?", "response_a": "Yes.", "response_b": "No."}], "normalize": True},
        ),
    ]


def assert_clean_500(response: httpx.Response) -> None:
    body = strict_json(response)
    assert response.headers["content-type"].startswith("application/json")
    assert body["error"]["type"] == "internal" and body["error"]["code"] == 500, body
    assert "non-finite" in body["error"]["message"] or "reference" in body["error"]["message"], body
