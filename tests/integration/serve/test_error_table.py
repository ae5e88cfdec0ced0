"""Every row of API.md's error table, provoked against a real server in both runtimes (Ray Serve and in-process),
each while a concurrent valid request still gets its correct reward. Small limits, an API key and fault injection are
configured so each row can be reached quickly."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from serve_harness import RUNTIMES, LiveApp, async_client, demo_config, running_app

pytestmark = pytest.mark.ray

TOL = 1e-5
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_LENGTH = 48
DEADLINE_S = 2.5
SLOW_APP, SLOW_PREFIX = "rmserve-slow", "/slow"


@pytest.fixture(scope="module", params=RUNTIMES)
def app(demo_model_dir, request):
    config = demo_config(
        demo_model_dir,
        model={"max_length": MAX_LENGTH, "truncation": "error"},
        limits={
            "max_items_per_request": 8,
            "max_body_bytes": 4096,
            "max_queued_items": 16,
            "request_timeout_s": DEADLINE_S,
            "retry_after_s": 2,
        },
        api_keys=[KEY],
        testing={"fault_injection": True},
        batching={"batch_wait_timeout_s": 0.02},
    )
    with running_app(config, request.param) as live:
        yield live


def ids(length: int, start: int = 10) -> list[int]:
    """A tokens item of exactly ``length`` tokens (fault injection keys on the length)."""
    return [(start + k) % 600 + 5 for k in range(length)]


VALID = {"items": [{"prompt": "Tell me about owls.", "response": "Of course. Owls have inspired many stories."}]}


@pytest.fixture
async def client(app):
    async with async_client(app, headers=AUTH) as c:
        yield c


async def with_valid_request(client: httpx.AsyncClient, offline, bad_request) -> httpx.Response:
    """Run ``bad_request`` concurrently with a valid one; the valid one must succeed with the right reward."""
    bad, good = await asyncio.gather(bad_request, client.post("/v1/score", json=VALID))
    assert good.status_code == 200, good.text
    assert good.json()["rewards"] == pytest.approx(offline.score(VALID["items"]), abs=TOL)
    return bad


def assert_error(response: httpx.Response, status: int, type_: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code", "param"}
    assert (body["error"]["type"], body["error"]["code"]) == (type_, status)
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# -- 422 / 400 invalid_request, 404 model, 400 context_length_exceeded, 413, 401: every route -------------------
# API.md: ``param`` names the failing field in the caller's own request; one status for one kind of mistake wherever
# it is caught (the Gateway's schema or the Scorer's item checks): 422 on the native routes and /get_reward, 400 on
# /classify (vLLM's status). An over-long item (truncation "error") is 400 context_length_exceeded everywhere.
LONG = "owls " * 60  # more than MAX_LENGTH tokens
NATIVE = ["/v1/score", "/score"]
CASES = [
    # (path, body or raw bytes, status, type, param)
    *[(p, b'{"items": [{"text": "x"}', 422, "invalid_request", None) for p in NATIVE],
    ("/v1/score", b'{"items": [{"input_ids": [1, NaN]}]}', 422, "invalid_request", None),
    ("/v1/score", {"items": [{"prompt": 1, "response": "r"}]}, 422, "invalid_request", "items[0].prompt"),
    ("/v1/score", {"items": [{"text": "x"}], "temperature": 1}, 422, "invalid_request", "temperature"),
    ("/v1/score", {"items": []}, 422, "invalid_request", "items"),
    ("/v1/score", {"items": [{"text": "x"}, {"input_ids": [1]}]}, 422, "invalid_request", "items"),
    ("/score", {"items": [{"input_ids": [1, 2]}, {"input_ids": [1, 2, 100000]}]}, 422, "invalid_request",
     "items[1].input_ids[2]"),
    ("/v1/score", {"items": [{"prompt": [{"role": "wizard", "content": "q"}], "response": "r"}]}, 422,
     "invalid_request", "items[0].prompt[0].role"),
    ("/v1/score", {"items": [{"messages": [{"role": "user", "content": "q"}]}]}, 422, "invalid_request",
     "items[0].messages"),
    ("/v1/score", {"items": [{"text": "x"}], "normalize": True}, 422, "invalid_request", "normalize"),
    # the demo's chat template renders contents only: an assistant's tool calls would vanish from the scored text
    ("/v1/score", {"items": [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None,
                                           "tool_calls": [{"type": "function", "function": {"name": "f"}}]}]}]},
     422, "invalid_request", "items[0].messages"),
    ("/v1/score", {"items": [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                                           {"role": "assistant", "content": "a"}]}]}, 422, "invalid_request",
     "items[0].messages[0].content"),
    ("/v1/preference", {"pairs": []}, 422, "invalid_request", "pairs"),
    ("/v1/preference", b"[", 422, "invalid_request", None),
    ("/v1/preference", {"pairs": [{"prompt": "q", "response_a": "a", "response_b": 1}]}, 422, "invalid_request",
     "pairs[0].response_b"),
    ("/v1/preference", {"pairs": [{"prompt": [{"role": "wizard", "content": "q"}], "response_a": "a",
                                   "response_b": "b"}]}, 422, "invalid_request", "pairs[0].prompt[0].role"),
    ("/v1/rerank", b"{", 422, "invalid_request", None),
    ("/v1/rerank", {"groups": [{"prompt": "q", "responses": ["a"]}], "top_k": -1}, 422, "invalid_request", "top_k"),
    ("/v1/rerank", {"groups": [{"prompt": "q", "responses": []}]}, 422, "invalid_request", "groups[0].responses"),
    ("/get_reward", b'{"query": ["x"', 422, "invalid_request", None),
    ("/get_reward", {"query": ["a", 7]}, 422, "invalid_request", "query[1]"),
    ("/get_reward", {"query": ["a", "b", "c", "d", "e", ""]}, 422, "invalid_request", "query[5]"),
    ("/classify", b"{not json", 400, "invalid_request", None),
    ("/classify", {"input": ["a", "b", ""]}, 400, "invalid_request", "input[2]"),
    ("/classify", {"input": ""}, 400, "invalid_request", "input"),
    ("/classify", {"input": [[1, 2], [3, 100000]]}, 400, "invalid_request", "input[1][1]"),
    ("/classify", {"input": "a", "use_activation": "yes"}, 400, "invalid_request", "use_activation"),
    # unknown model: 404 on every route that takes one
    *[(p, {"items": [{"text": "x"}], "model": "other-model"}, 404, "invalid_request", "model") for p in NATIVE],
    ("/v1/preference", {"pairs": [{"prompt": "q", "response_a": "a", "response_b": "b"}], "model": "other-model"},
     404, "invalid_request", "model"),
    ("/v1/rerank", {"groups": [{"prompt": "q", "responses": ["a"]}], "model": "other-model"}, 404,
     "invalid_request", "model"),
    ("/classify", {"input": "a", "model": "other-model"}, 404, "invalid_request", "model"),
    # context_length_exceeded
    *[(p, {"items": [{"text": "ok"}, {"text": LONG}]}, 400, "context_length_exceeded", "items[1]") for p in NATIVE],
    ("/v1/preference", {"pairs": [{"prompt": "q", "response_a": "a", "response_b": LONG}]}, 400,
     "context_length_exceeded", "pairs[0].response_b"),
    ("/v1/preference", {"pairs": [{"prompt": "q", "response_a": "a", "response_b": "b"},
                                  {"prompt": "q", "response_a": LONG, "response_b": ""}]}, 400,
     "context_length_exceeded", "pairs[1].response_a"),
    ("/v1/rerank", {"groups": [{"prompt": "q", "responses": ["a", "", "c", LONG]}]}, 400, "context_length_exceeded",
     "groups[0].responses[3]"),
    ("/v1/rerank", {"groups": [{"prompt": "q", "responses": ["a"]}, {"prompt": "q", "responses": ["a", LONG]}]},
     400, "context_length_exceeded", "groups[1].responses[1]"),
    ("/get_reward", {"query": ["ok", LONG]}, 400, "context_length_exceeded", "query[1]"),
    ("/classify", {"input": ["ok", LONG]}, 400, "context_length_exceeded", "input[1]"),
    ("/classify", {"input": LONG}, 400, "context_length_exceeded", "input"),
    # request_too_large: more than 8 items
    *[(p, {"items": [{"text": "x"}] * 9}, 413, "request_too_large", None) for p in NATIVE],
    ("/v1/preference", {"pairs": [{"prompt": "q", "response_a": "a", "response_b": "b"}] * 5}, 413,
     "request_too_large", None),
    ("/v1/rerank", {"groups": [{"prompt": "q", "responses": ["a"] * 9}]}, 413, "request_too_large", None),
    ("/get_reward", {"query": ["x"] * 9}, 413, "request_too_large", None),
    ("/classify", {"input": ["x"] * 9}, 413, "request_too_large", None),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status", "type_", "param"), CASES)
async def test_error_rows_name_the_callers_field_on_every_route(client, offline, path, body, status, type_, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    error = assert_error(await with_valid_request(client, offline, client.post(path, **kwargs)), status, type_)
    assert error["param"] == param, error
    if param is not None and "[" in param:  # an item's error: the message starts with the same path
        assert error["message"].startswith(f"{param}: "), error


async def test_unknown_route_and_method_use_the_error_body(client, offline):
    assert_error(await with_valid_request(client, offline, client.get("/v1/nothing")), 404, "invalid_request")
    assert_error(await with_valid_request(client, offline, client.get("/v1/score")), 405, "invalid_request")


# -- 413 request_too_large -------------------------------------------------------------------------
async def test_body_over_the_limit(client, offline):
    big = {"items": [{"text": "word " * 2000}]}
    assert_error(
        await with_valid_request(client, offline, client.post("/v1/score", json=big)), 413, "request_too_large"
    )

    async def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(10):
            yield b" " * 1000

    chunked = client.post("/v1/score", content=chunks())
    assert_error(await with_valid_request(client, offline, chunked), 413, "request_too_large")


async def test_item_count_over_the_limit(client, offline):
    nine = {"items": [{"input_ids": ids(3, start=k)} for k in range(9)]}
    error = assert_error(
        await with_valid_request(client, offline, client.post("/v1/score", json=nine)), 413, "request_too_large"
    )
    assert "9 items exceed the limit of 8" in error["message"]
    five_pairs = {"pairs": [{"prompt": "q", "response_a": "a", "response_b": "b"}] * 5}  # 10 items
    too_many = client.post("/v1/preference", json=five_pairs)
    assert_error(await with_valid_request(client, offline, too_many), 413, "request_too_large")


# -- 401 unauthorized ------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": KEY + "x"}])
@pytest.mark.parametrize("path", ["/v1/score", "/score", "/v1/preference", "/v1/rerank", "/get_reward", "/classify"])
async def test_missing_or_wrong_api_key(app, client, offline, headers, path):
    body = {"/get_reward": {"query": ["x"]}, "/classify": {"input": "x"}}.get(path, VALID)
    async with async_client(app, headers=headers) as anonymous:
        response = await with_valid_request(client, offline, anonymous.post(path, json=body))
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


async def test_operational_routes_are_open_by_default(app):
    async with async_client(app) as anonymous:
        assert (await anonymous.get("/health")).status_code == 200
        assert (await anonymous.get("/ready")).status_code == 200


# -- 429 overloaded --------------------------------------------------------------------------------
async def test_queue_full_is_429_with_retry_after(app, client, offline):
    await app.set_faults(delays={40: 1.0})  # requests holding a 40-token item stay queued for 1 s
    try:
        valid = {"items": [{"input_ids": ids(40, start=1)}]}
        fillers = [{"items": [{"input_ids": ids(40, start=s)} for s in range(2, 10)]}]  # 8 items
        fillers.append({"items": [{"input_ids": ids(40, start=s)} for s in range(10, 17)]})  # 7 items
        admitted = [asyncio.create_task(client.post("/v1/score", json=body)) for body in [valid, *fillers]]
        for _ in range(100):  # until the scorer holds 1 + 8 + 7 = 16 items, its limit
            if (await app.stats())["queued_items"] == 16:
                break
            await asyncio.sleep(0.02)
        rejected = await client.post("/v1/score", json={"items": [{"input_ids": ids(5)}]})
        error = assert_error(rejected, 429, "overloaded")
        assert rejected.headers["retry-after"] == "2" and "retry after 2 s" in error["message"]
        for task, body in zip(admitted, [valid, *fillers], strict=True):
            response = await task  # admitted before the queue filled: all succeed, with their own rewards
            assert response.status_code == 200, response.text
            assert response.json()["rewards"] == pytest.approx(offline.score(body["items"]), abs=TOL)
        stats = await app.stats()
        assert stats["queued_items"] == 0 and stats["rejected_requests"] >= 1
    finally:
        await app.set_faults()
    assert (await client.post("/v1/score", json=VALID)).status_code == 200


# -- 503 not_ready ---------------------------------------------------------------------------------
@pytest.fixture
def slow_app(app: LiveApp):
    """A second application whose Scorer takes minutes to load; its Gateway answers meanwhile.

    Deployed without waiting for it to be running (``serve.run`` would wait), and deleted afterwards. (In one
    process the model loads before the server listens: there is no such window.)
    """
    app.only_ray()
    from ray import serve

    from rmserve.serve import build_app

    slow = app.config.model_copy(
        update={"app_name": SLOW_APP, "testing": app.config.testing.model_copy(update={"scorer_start_delay_s": 300})}
    )
    target = serve.RunTarget(build_app(slow), name=SLOW_APP, route_prefix=SLOW_PREFIX)
    serve.run_many([target], wait_for_applications_running=False)
    yield SLOW_PREFIX
    serve.delete(SLOW_APP)


async def test_model_not_loaded_yet_is_503(client, offline, slow_app):
    for _ in range(300):  # until the slow app's Gateway is routed (its Scorer is still loading)
        if (await client.get(f"{slow_app}/health")).status_code == 200:
            break
        await asyncio.sleep(0.1)
    ready = await with_valid_request(client, offline, client.get(f"{slow_app}/ready"))
    assert_error(ready, 503, "not_ready")
    bodies = {
        "/v1/score": VALID,
        "/score": VALID,
        "/v1/preference": {"pairs": [{"prompt": "q", "response_a": "a", "response_b": "b"}]},
        "/v1/rerank": {"groups": [{"prompt": "q", "responses": ["a"]}]},
        "/get_reward": {"query": ["x"]},
        "/classify": {"input": "x"},
    }
    for path, body in bodies.items():
        score = await with_valid_request(client, offline, client.post(f"{slow_app}{path}", json=body))
        assert "not loaded yet" in assert_error(score, 503, "not_ready")["message"], path
    assert (await client.get("/ready")).json() == {"status": "ready", "model": offline.model_id}


async def until_the_queue_is_empty(app: LiveApp) -> None:
    """Await (bounded) the Scorer's queue count reaching 0, e.g. after a withdrawal that travels to the replica."""
    for _ in range(100):
        if (await app.stats())["queued_items"] == 0:
            break
        await asyncio.sleep(0.05)
    assert (await app.stats())["queued_items"] == 0


# -- 504 timeout -----------------------------------------------------------------------------------
async def test_request_past_its_deadline_is_504_and_cancelled(app, client, offline):
    await app.set_faults(delays={44: 30.0})
    try:
        slow = client.post("/v1/score", json={"items": [{"input_ids": ids(44)}]})
        error = assert_error(await with_valid_request(client, offline, slow), 504, "timeout")
        assert "deadline" in error["message"]
        await until_the_queue_is_empty(app)  # the cancellation reached the replica: the item left its queue
    finally:
        await app.set_faults()


# -- 500 internal ----------------------------------------------------------------------------------
async def test_unexpected_failure_is_a_sanitised_500_for_its_own_request_only(app, client, offline):
    await app.set_faults(fail_on_length=33)  # a forward whose longest row has 33 tokens raises
    try:
        bad = client.post("/v1/score", json={"items": [{"input_ids": ids(33)}]})
        error = assert_error(await with_valid_request(client, offline, bad), 500, "internal")
        assert "reference" in error["message"] and "/internal/detail" not in error["message"]
        assert "Injected" not in error["message"]
        assert error["message"].startswith("items[0]: internal error") and error["param"] == "items[0]"

        # The failing item shares a batch with shorter items of other requests: they still get their rewards.
        before = (await app.stats())["rescored_batches"]
        for attempt in range(5):
            others = [{"items": [{"input_ids": ids(10 + k, start=k)}]} for k in range(12)]  # 13 items <= queue of 16
            responses = await asyncio.gather(
                client.post("/v1/score", json={"items": [{"input_ids": ids(33, start=attempt)}]}),
                *(client.post("/v1/score", json=body) for body in others),
            )
            assert_error(responses[0], 500, "internal")
            for response, body in zip(responses[1:], others, strict=True):
                assert response.status_code == 200, response.text
                assert response.json()["rewards"] == pytest.approx(offline.score(body["items"]), abs=TOL)
            if (await app.stats())["rescored_batches"] > before:
                break
        assert (await app.stats())["rescored_batches"] > before, "the failing item never shared a batch"
    finally:
        await app.set_faults()


def failing_request(path: str, offline) -> tuple[dict, int, str]:
    """A body for ``path`` with one item of a length no other item here has, that length, and the caller's field
    of that item (fault injection keys on item length)."""
    prompt, response = "Tell me about bees.", "Bees are wonderful and busy, thank you for asking about them."
    pair_length = len(offline.tokenize({"prompt": prompt, "response": response}).input_ids)
    text = "Bees change with the seasons and bees are lovely."
    if path in ("/v1/score", "/score"):
        return {"items": [{"input_ids": ids(31)}]}, 31, "items[0]"
    if path == "/classify":
        return {"input": [ids(12), ids(31)], "activation": False}, 31, "input[1]"
    if path == "/v1/preference":
        body = {"pairs": [{"prompt": prompt, "response_a": "No.", "response_b": response}]}
        return body, pair_length, "pairs[0].response_b"
    if path == "/v1/rerank":
        return (
            {"groups": [{"prompt": prompt, "responses": ["No.", "Maybe.", response]}]},
            pair_length,
            ("groups[0].responses[2]"),
        )
    return {"query": ["Hello there.", text]}, len(offline.tokenize({"text": text}).input_ids), "query[1]"


SCORING_ROUTES = ["/v1/score", "/score", "/v1/preference", "/v1/rerank", "/get_reward", "/classify"]


@pytest.mark.parametrize("path", SCORING_ROUTES)
async def test_500_and_504_on_every_scoring_route(app, client, offline, path):
    """API.md's 500 and 504 rows on each route: the failing item is named in the caller's terms (500); a request
    past its deadline is a 504 and leaves the queue; a concurrent valid request is unaffected either way."""
    body, length, param = failing_request(path, offline)
    valid_length = len(offline.tokenize(VALID["items"][0]).input_ids)
    assert length not in (valid_length, 12) and length < MAX_LENGTH
    try:
        await app.set_faults(fail_on_length=length)
        error = assert_error(await with_valid_request(client, offline, client.post(path, json=body)), 500, "internal")
        assert error["param"] == param and error["message"].startswith(f"{param}: internal error"), error
        await app.set_faults(delays={length: 30.0})
        error = assert_error(await with_valid_request(client, offline, client.post(path, json=body)), 504, "timeout")
        assert error["param"] is None
        await until_the_queue_is_empty(app)  # the deadline withdrew the request: its item left the queue
    finally:
        await app.set_faults()
