"""The ``SleepBoard`` (the MetricsHub's broadcast of sleep and wake to every Scorer replica) without Ray: replicas'
long polls are plain ``watch`` calls, so which replica acknowledged what is decided by the test."""

from __future__ import annotations

import asyncio
import contextlib

from rmserve.serve.rayserve.metrics_hub import OTHER_BUILD, MetricsHub
from rmserve.serve.rayserve.sleep_board import Posted, SleepBoard


async def stop(*polls: asyncio.Future) -> None:
    """End polls a test leaves open (awaited, so nothing is pending when the loop closes)."""
    for poll in polls:
        poll.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poll


async def test_a_level_is_done_once_every_live_replica_applied_it():
    board = SleepBoard(poll_wait_s=30)
    polls = {m: asyncio.ensure_future(board.watch(m, "Scorer", 0, 0, None)) for m in ("Scorer#a", "Scorer#b")}
    other = asyncio.ensure_future(board.watch("Scorer-safe#c", "Scorer-safe", 0, 0, None))  # another model
    await asyncio.sleep(0)
    setting = asyncio.ensure_future(board.set_level("Scorer", 2, timeout_s=30))
    posted = [await poll for poll in polls.values()]
    assert posted[0] == posted[1] and posted[0].level == 2
    assert not other.done()  # the other model's replicas are not told
    # Replica a applied it; b has not yet: the request is not done.
    polls["Scorer#a"] = asyncio.ensure_future(board.watch("Scorer#a", "Scorer", posted[0].version, 2, None))
    await asyncio.sleep(0)
    assert not setting.done() and board.levels("Scorer") == [0, 2]
    polls["Scorer#b"] = asyncio.ensure_future(board.watch("Scorer#b", "Scorer", posted[0].version, 2, None))
    assert await setting == {"replicas": 2, "acknowledged": 2, "levels": [2, 2], "errors": []}
    assert board.levels("Scorer") == [2, 2] and board.levels("Scorer-safe") == [0]
    await stop(*polls.values(), other)


async def test_a_replica_that_does_not_answer_is_reported_and_a_late_one_follows():
    board = SleepBoard(poll_wait_s=30)
    stuck = asyncio.ensure_future(board.watch("Scorer#a", "Scorer", 0, 0, None))
    await asyncio.sleep(0)
    answer = await board.set_level("Scorer", 1, timeout_s=0.05)
    assert answer == {"replicas": 1, "acknowledged": 0, "levels": [0], "errors": []}
    posted = await stuck
    # A replica that starts now reads the posted level on its first poll, at once.
    assert await board.watch("Scorer#new", "Scorer", 0, 0, None) == posted == Posted(posted.version, 1)


async def test_failures_are_reported_and_no_replica_means_not_done():
    board = SleepBoard(poll_wait_s=30)
    assert (await board.set_level("Scorer", 1, timeout_s=0.01))["replicas"] == 0  # nobody polled yet
    first = await board.watch("Scorer#a", "Scorer", 0, 0, None)  # the replica starts: it reads level 1 at once
    assert first.level == 1
    poll = asyncio.ensure_future(board.watch("Scorer#a", "Scorer", first.version, 1, None))
    await asyncio.sleep(0)
    setting = asyncio.ensure_future(board.set_level("Scorer", 0, timeout_s=30))
    posted = await poll
    assert posted.level == 0 and posted.version > first.version
    poll = asyncio.ensure_future(board.watch("Scorer#a", "Scorer", posted.version, 1, "ModelLoadError: gone"))
    assert await setting == {"replicas": 1, "acknowledged": 1, "levels": [1], "errors": ["ModelLoadError: gone"]}
    await stop(poll)


async def test_the_hub_answers_only_its_own_build():
    hub = MetricsHub("build-1", poll_wait_s=0.01)
    assert await hub.watch_sleep("Scorer#a", "Scorer", 0, 0, None, "build-0") == OTHER_BUILD
    assert await hub.watch_sleep("Scorer#a", "Scorer", 0, 0, None, "build-1") is None  # a heartbeat: nothing posted
    assert hub.sleep_levels("Scorer") == [0]


def test_a_replicas_4xx_reaches_the_caller_as_it_answered():
    from rmserve.serve.edge.errors import error_response
    from rmserve.serve.rayserve.link import _from_body

    body = {"message": "sleep level 1 cannot move quantized weights", "type": "invalid_request", "code": 422}
    response = error_response(_from_body({**body, "param": "level"}))
    assert response.status_code == 422 and response.body.startswith(b'{"error":{"message":"sleep level 1')
