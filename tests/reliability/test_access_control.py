"""Issue 7.6 — access control: API keys from the config or ``RMSERVE_API_KEYS``, compared in constant time; 401
without a key or with a wrong one on every scoring route (native and compatibility); ``/health``, ``/ready``,
``/v1/models`` and ``/metrics`` open or protected by ``protect_operational_routes``; the SDK sends the key (argument
or ``RMSERVE_API_KEY``) and never retries a 401; no key, right or wrong, ever reaches a log.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import secrets
from pathlib import Path

import httpx
import pytest
from reliability_harness import TOL, app_config, deployed, offline_model

from rmserve.client import AsyncRewardClient, RewardClient, UnauthorizedError
from rmserve.model.errors import UnauthorizedError as UnauthorizedServerError
from rmserve.serve.edge.auth import ApiKeyAuth

pytestmark = pytest.mark.timeout(300)

# Random per run, so finding one in a log cannot be a coincidence.
KEY_A, KEY_B = f"rk-a-{secrets.token_hex(12)}", f"rk-b-{secrets.token_hex(12)}"
WRONG = f"rk-wrong-{secrets.token_hex(12)}"
SCORING = {
    "/v1/score": {"items": [{"prompt": "Tell me about tea.", "response": "Gladly! Tea has a long history."}]},
    "/score": {"items": [{"text": "Tea is nice."}]},
    "/v1/preference": {"pairs": [{"prompt": "Tea?", "response_a": "Yes, tea.", "response_b": "No."}]},
    "/v1/rerank": {"groups": [{"prompt": "Tea?", "responses": ["Yes, tea.", "No."]}]},
    "/get_reward": {"query": ["Tea is nice."]},
    "/classify": {"input": "Tea is nice.", "use_activation": False},
}
OPERATIONAL = ("/health", "/ready", "/v1/models", "/metrics")
BAD_CREDENTIALS = {
    "no key": {},
    "wrong key": {"Authorization": f"Bearer {WRONG}"},
    "right key, wrong scheme": {"Authorization": f"Basic {KEY_A}"},
    "bearer without a key": {"Authorization": "Bearer"},
    "key with a suffix": {"Authorization": f"Bearer {KEY_A}x"},
    "key prefix": {"Authorization": f"Bearer {KEY_A[:-1]}"},
    "wrong X-API-Key": {"X-API-Key": WRONG},
    "Basic, wrong password": {"Authorization": "Basic " + base64.b64encode(f"rmserve:{WRONG}".encode()).decode()},
    "Basic, the key as user and a wrong password": {
        "Authorization": "Basic " + base64.b64encode(f"{KEY_A}:{WRONG}".encode()).decode()
    },
}


@pytest.fixture(scope="module")
def locked_app(serve_instance, demo_model_dir):
    """Keys from the environment variable (as an operator sets them); operational routes protected too."""
    environ = {"RMSERVE_API_KEYS": f"{KEY_A}, {KEY_B}"}
    # Ray's access log on, so that the log grep of test_no_key_is_ever_logged covers a line per request.
    config = app_config(demo_model_dir, "rel-locked", environ=environ, protect_operational_routes=True, access_log=True)
    assert [k.get_secret_value() for k in config.api_keys] == [KEY_A, KEY_B]
    assert KEY_A not in repr(config) and KEY_A not in str(config.model_dump())  # SecretStr: masked
    with deployed(serve_instance, config, prefix="/locked") as app:
        yield app


@pytest.fixture(scope="module")
def open_ops_app(serve_instance, demo_model_dir):
    """Keys from the config; operational routes open (the default)."""
    config = app_config(demo_model_dir, "rel-open-ops", api_keys=[KEY_A])
    assert config.protect_operational_routes is False
    with deployed(serve_instance, config, prefix="/open-ops") as app:
        yield app


def assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["type"] == "unauthorized"
    assert KEY_A not in response.text and KEY_B not in response.text and WRONG not in response.text


@pytest.mark.ray
@pytest.mark.parametrize("route", sorted(SCORING))
async def test_every_scoring_route_needs_a_valid_key(locked_app, route):
    async with locked_app.client() as client:
        for label, headers in BAD_CREDENTIALS.items():
            response = await client.post(route, json=SCORING[route], headers=headers)
            try:
                assert_401(response)
            except AssertionError as exc:
                raise AssertionError(f"{route} with {label}: {exc}") from None
        for headers in (
            {"Authorization": f"Bearer {KEY_A}"},
            {"Authorization": f"bearer {KEY_B}"},
            {"X-API-Key": KEY_B},
            {"Authorization": "Basic " + base64.b64encode(f"rmserve:{KEY_A}".encode()).decode()},
        ):
            response = await client.post(route, json=SCORING[route], headers=headers)
            assert response.status_code == 200, (route, headers, response.text)


@pytest.mark.ray
async def test_a_trainer_that_sends_no_headers_authenticates_with_the_key_in_its_url(locked_app):
    """OpenRLHF's and slime's reward clients post with aiohttp and no headers of their own: the key goes in the URL
    they are configured with, which aiohttp sends as Basic credentials (the password, or the user name alone)."""
    import aiohttp

    async def post(url: str) -> tuple[int, dict]:
        async with aiohttp.ClientSession() as session, session.post(url, json={"query": ["Tea is nice."]}) as reply:
            return reply.status, await reply.json()

    host = locked_app.url.removeprefix("http://")
    for userinfo in (f"rmserve:{KEY_A}", KEY_B):
        status, body = await post(f"http://{userinfo}@{host}/get_reward")
        assert status == 200 and len(body["rewards"]) == 1, (status, body)
    for userinfo in (f"rmserve:{WRONG}", "rmserve", f"{KEY_A[:-1]}"):
        status, body = await post(f"http://{userinfo}@{host}/get_reward")
        assert status == 401 and body["error"]["type"] == "unauthorized", (userinfo, status, body)


@pytest.mark.ray
async def test_operational_routes_follow_protect_operational_routes(locked_app, open_ops_app, figures):
    async with locked_app.client() as locked, open_ops_app.client() as open_ops:
        for path in OPERATIONAL:
            assert_401(await locked.get(path))
            assert_401(await locked.get(path, headers={"Authorization": f"Bearer {WRONG}"}))
            assert (await locked.get(path, headers={"Authorization": f"Bearer {KEY_A}"})).status_code == 200, path
            assert (await open_ops.get(path)).status_code == 200, path
        for route, body in SCORING.items():  # open operational routes do not open the scoring routes
            assert_401(await open_ops.post(route, json=body))
            response = await open_ops.post(route, json=body, headers={"Authorization": f"Bearer {KEY_A}"})
            assert response.status_code == 200, response.text
    figures.record(
        "access control",
        scoring_routes=sorted(SCORING),
        bad_credentials_per_route=len(BAD_CREDENTIALS),
        operational_routes=list(OPERATIONAL),
    )


def count_401s(app) -> float:
    text = httpx.get(app.url + "/metrics", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("rmserve_requests_total{") and 'route="/v1/score"' in line and 'status="401"' in line:
            total += float(line.split()[-1])
    return total


@pytest.mark.ray
def test_the_sync_sdk_sends_the_key_and_never_retries_a_401(locked_app, monkeypatch):
    offline = offline_model(locked_app.config.model_spec())
    prompts, responses = ["Tell me about tea."], ["Gladly! Tea has a long history."]
    expected = offline.score([{"prompt": prompts[0], "response": responses[0]}])
    with RewardClient(locked_app.url, api_key=KEY_A) as client:
        assert client.score(prompts, responses) == pytest.approx(expected, abs=TOL)
        assert KEY_A not in repr(client)
    monkeypatch.setenv("RMSERVE_API_KEY", KEY_B)
    with RewardClient(locked_app.url) as client:
        assert client.score(prompts, responses) == pytest.approx(expected, abs=TOL)
    monkeypatch.delenv("RMSERVE_API_KEY")
    before = count_401s(locked_app)
    with RewardClient(locked_app.url, max_retries=5) as client, pytest.raises(UnauthorizedError) as info:
        client.score(prompts, responses)
    assert info.value.status == 401
    assert count_401s(locked_app) - before == 1  # one attempt: a 401 is not retried


@pytest.mark.ray
async def test_the_async_sdk_sends_the_key(locked_app):
    async with AsyncRewardClient(locked_app.url, api_key=KEY_B) as client:
        assert len(await client.score(["Tea?"], ["Yes."])) == 1
        assert (await client.ready()) is True
    async with AsyncRewardClient(locked_app.url, api_key=WRONG, max_retries=3) as client:
        with pytest.raises(UnauthorizedError):
            await client.score(["Tea?"], ["Yes."])


@pytest.mark.ray
def test_no_key_is_ever_logged(locked_app, open_ops_app, capfd):
    """Runs after the tests above sent every key (right and wrong) to every route: grep every log Ray wrote."""
    import ray

    httpx.post(locked_app.url + "/v1/score", json=SCORING["/v1/score"], headers={"Authorization": f"Bearer {WRONG}"})
    assert httpx.post(open_ops_app.url + "/v1/score", json=SCORING["/v1/score"]).status_code == 401
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    text = {p: p.read_bytes() for p in files}
    # The grep is not vacuous: the replicas' own logs are there and recorded the 401s.
    replica_logs = [p for p in files if "rel-locked" in p.name]
    assert replica_logs, sorted(p.name for p in files)[:50]
    assert any(b"401" in text[p] for p in replica_logs)
    # The other app runs with the default access_log=False: its replicas wrote no line per request.
    quiet_logs = [p for p in files if "rel-open-ops" in p.name]
    assert quiet_logs and not any(b"POST /open-ops" in text[p] for p in quiet_logs)
    for secret in (KEY_A, KEY_B, WRONG):
        leaks = [str(p) for p, content in text.items() if secret.encode() in content]
        assert not leaks, f"an API key appears in {leaks}"
    captured = capfd.readouterr()
    for secret in (KEY_A, KEY_B, WRONG):
        assert secret not in captured.out and secret not in captured.err


def test_keys_are_compared_in_constant_time(monkeypatch):
    """Every configured key is compared, with ``hmac.compare_digest`` on equal-length digests, whichever key matches
    (or none): the time does not depend on which key was presented or how much of it was right."""
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    auth = ApiKeyAuth(["k-first", "k-second-and-much-longer", "k3"])
    for presented in ("k-first", "k3", "k-wrong", "k-firs", "x" * 1000):
        calls.clear()
        with contextlib.suppress(UnauthorizedServerError):
            auth.check({"authorization": f"Bearer {presented}"})
        assert len(calls) == 3 and {lengths for lengths in calls} == {(32, 32)}, (presented, calls)
