"""Issue 7.7 — client gone: the items of a request whose HTTP client disconnected before its batch started are
dropped before the forward pass, and counted (``Scorer.stats()["client_gone_items"]`` and the Prometheus counter
``rmserve_client_gone_items_total``); the engine never sees them, and other requests in the same batch are unaffected.

Ray Serve cancels the Gateway's request when the client disconnects; the Gateway withdraws it from the Scorer, which
takes its waiting items out of its queue (``ScoringCore.withdraw``). A forward stalled by the fault plan keeps the
victim's items waiting long enough to disconnect deterministically.
"""

from __future__ import annotations

import asyncio

import pytest
from reliability_harness import TOL, ids_of_length, offline_model

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

STALL_LENGTH, STALL_S = 60, 4.0  # a forward whose longest row has 60 tokens stalls 4 s
DELAY_LENGTH, DELAY_S = 33, 3.0  # a request holding a 33-token item waits 3 s before joining a batch


@pytest.fixture(scope="module")
def app(faults_app):
    return faults_app


async def counters(app, client) -> dict[str, float]:
    stats = await app.stats()
    out = {"gone": stats["client_gone_items"], "engine_items": stats["engine"]["items"]}
    text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("rmserve_client_gone_items_total "):
            out["metric"] = float(line.split()[1])
    return out


async def disconnect_after(app, body: dict, seconds: float) -> None:
    """Send ``body`` on a connection of its own and close that connection after ``seconds``."""
    async with app.client() as own:
        task = asyncio.ensure_future(own.post("/v1/score", json=body))
        await asyncio.sleep(seconds)
        assert not task.done(), "the request finished before the client could go away"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def wait_for_gone(app, client, expected: float) -> dict[str, float]:
    for _ in range(100):
        now = await counters(app, client)
        if now["gone"] >= expected:
            return now
        await asyncio.sleep(0.1)
    return await counters(app, client)


async def test_items_waiting_behind_a_forward_are_dropped_when_their_client_goes(app, figures):
    offline = offline_model(app.config.model_spec())
    slow = {"items": [{"input_ids": ids_of_length(STALL_LENGTH, 1)}]}
    victim = {"items": [{"input_ids": ids_of_length(20, seed)} for seed in range(5)]}
    neighbour = {"items": [{"input_ids": ids_of_length(21, seed)} for seed in range(3)]}
    async with app.client() as client:
        await app.set_faults(forward_delays={STALL_LENGTH: STALL_S})
        try:
            before = await counters(app, client)
            slow_task = asyncio.ensure_future(client.post("/v1/score", json=slow))
            await asyncio.sleep(1.0)  # the slow forward is running; what comes now waits for it
            neighbour_task = asyncio.ensure_future(client.post("/v1/score", json=neighbour))
            await disconnect_after(app, victim, 1.0)
            slow_response, neighbour_response = await asyncio.gather(slow_task, neighbour_task)
            after = await wait_for_gone(app, client, before["gone"] + 5)
        finally:
            await app.set_faults()
        # The others got their own correct rewards.
        for response, body in ((slow_response, slow), (neighbour_response, neighbour)):
            assert response.status_code == 200, response.text
            assert response.json()["rewards"] == pytest.approx(offline.score(body["items"]), abs=TOL)
        # The victim's 5 items were dropped, and only those: when the Gateway had merged the victim and the neighbour
        # into one Scorer call (they arrive together), the victim alone was withdrawn (serve/rayserve/coalescing.py).
        dropped = after["gone"] - before["gone"]
        assert dropped == 5, dropped
        # The engine ran the slow item and the neighbour's 3 items once, never the victim's 5.
        assert after["engine_items"] - before["engine_items"] == 1 + 3
        if "metric" in before:
            assert after["metric"] - before["metric"] == dropped
        assert (await app.stats())["queued_items"] == 0
        # The server keeps working normally.
        response = await client.post("/v1/score", json=victim)
        assert response.json()["rewards"] == pytest.approx(offline.score(victim["items"]), abs=TOL)
    figures.record("client gone", items_dropped_behind_a_forward=dropped, engine_items_for_them=0)


async def test_items_not_yet_queued_are_dropped_when_their_client_goes(app):
    victim = {"items": [{"input_ids": ids_of_length(DELAY_LENGTH, seed)} for seed in range(4)]}
    async with app.client() as client:
        await app.set_faults(delays={DELAY_LENGTH: DELAY_S})
        try:
            before = await counters(app, client)
            await disconnect_after(app, victim, 1.0)
            after = await wait_for_gone(app, client, before["gone"] + 4)
            await asyncio.sleep(DELAY_S)  # past the delay: nothing of the victim reaches the engine later
            final = await counters(app, client)
        finally:
            await app.set_faults()
    assert after["gone"] - before["gone"] == 4
    assert final["engine_items"] == before["engine_items"]
    assert final["gone"] == after["gone"]
    assert (await app.stats())["queued_items"] == 0


async def test_a_request_that_completes_is_not_counted(app):
    async with app.client() as client:
        before = await counters(app, client)
        response = await client.post("/v1/score", json={"items": [{"text": "Tea is nice."}, {"text": "So is coffee."}]})
        assert response.status_code == 200
        after = await counters(app, client)
    assert after["gone"] == before["gone"]
    assert after["engine_items"] - before["engine_items"] == 2
