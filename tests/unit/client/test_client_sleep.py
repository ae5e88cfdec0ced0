"""The SDK's sleep and wake: the requests ``sleep()`` / ``wake_up()`` / ``is_sleeping()`` send, what they return,
the ``sleeping`` error type, and how scoring retries a 503 ``sleeping`` (the server's ``Retry-After``)."""

from __future__ import annotations

import httpx
import pytest
from client_fakes import Sleeps, call, make_client

from rmserve.client import NotReadyError, SleepingError

SLEEPING = {"error": {"message": "model m is asleep (level 1)", "type": "sleeping", "code": 503, "param": None}}


def state_server(seen: list[httpx.Request]):
    """A server that sleeps and wakes on request and answers scoring with 503 sleeping while asleep."""
    state = {"asleep": False}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path = request.url.path
        if path in ("/sleep", "/wake_up"):
            state["asleep"] = path == "/sleep"
        if path in ("/sleep", "/wake_up", "/is_sleeping"):
            return httpx.Response(200, json={"is_sleeping": state["asleep"]})
        if state["asleep"]:
            return httpx.Response(503, json=SLEEPING, headers={"Retry-After": "2"})
        return httpx.Response(200, json={"model": "m", "rewards": [1.5], "usage": {"input_tokens": 3}})

    return handler


def test_sleep_wake_and_state(mode):
    seen: list[httpx.Request] = []
    client = make_client(mode, state_server(seen))
    assert call(client, "is_sleeping") is False
    assert call(client, "sleep", 2) is True
    assert call(client, "is_sleeping") is True
    assert call(client, "wake_up") is False
    assert call(client, "sleep") is True  # level 1 by default
    assert [(r.method, r.url.path, r.url.query.decode()) for r in seen] == [
        ("GET", "/is_sleeping", ""),
        ("POST", "/sleep", "level=2"),
        ("GET", "/is_sleeping", ""),
        ("POST", "/wake_up", ""),
        ("POST", "/sleep", "level=1"),
    ]


@pytest.mark.parametrize("level", [0, 3, True, "2"])
def test_only_levels_1_and_2(mode, level):
    client = make_client(mode, state_server([]))
    with pytest.raises(ValueError, match="level"):
        call(client, "sleep", level)


def test_scoring_a_sleeping_server_retries_after_the_advised_wait_then_raises(mode):
    seen: list[httpx.Request] = []
    sleeps = Sleeps()
    client = make_client(mode, state_server(seen), sleeps=sleeps, max_retries=2)
    call(client, "sleep")
    with pytest.raises(SleepingError) as info:
        call(client, "score", ["p"], ["r"])
    err = info.value
    assert err.status == 503 and err.type == "sleeping" and err.retry_after == 2.0
    assert not isinstance(err, NotReadyError)
    assert len(seen) == 1 + 3 and list(sleeps) == [2.25, 2.25]  # Retry-After plus the fixed jitter, twice


def test_a_scoring_call_that_races_a_wake_up_succeeds(mode):
    answers = iter([httpx.Response(503, json=SLEEPING, headers={"Retry-After": "1"})])

    def handler(request: httpx.Request) -> httpx.Response:  # asleep for the first attempt, awake for the retry
        fallback = httpx.Response(200, json={"model": "m", "rewards": [1.5], "usage": {"input_tokens": 3}})
        return next(answers, fallback)

    sleeps = Sleeps()
    assert call(make_client(mode, handler, sleeps=sleeps), "score", ["p"], ["r"]) == [1.5]
    assert list(sleeps) == [1.125]
