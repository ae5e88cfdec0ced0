"""The Gateway's request coalescer without Ray: merging, per-request results, and clients that leave.

``LocalHandle`` plays the part of a Ray ``DeploymentHandle`` in-process: ``.score_request.remote(x)`` starts the
coroutine as a task and returns something that can be awaited and cancelled, as a ``DeploymentResponse`` can;
``.options(stream=True).score_requests_streamed.remote(x)`` is an async iterator of ``(index, result)``;
``.withdraw.remote(ids)`` records the withdrawn request ids.
"""

from __future__ import annotations

import asyncio

import pytest

from rmserve.serve.config.settings import ServerConfig
from rmserve.serve.rayserve.coalescing import RequestCoalescer, splits_by_prefix


class _Response:
    def __init__(self, task: asyncio.Task):
        self.task = task

    def __await__(self):
        return self.task.__await__()

    def cancel(self) -> None:
        self.task.cancel()


class _Method:
    def __init__(self, run):
        self.run = run

    def remote(self, *args):
        return _Response(asyncio.ensure_future(self.run(*args)))


class _StreamMethod:
    """``handle.options(stream=True).method.remote(x)``: an async iterator over ``(index, result)``."""

    def __init__(self, run):
        self.run = run

    def remote(self, *args):
        async def stream():
            for indexed in enumerate(await self.run(*args)):
                yield indexed

        return stream()


class LocalHandle:
    """Scores each request as the sum of its items; records every call; a request of ["boom"] gets an error."""

    def __init__(self, delay_s: float = 0.0):
        self.calls: list[list] = []
        self.withdrawn: list[list[str]] = []
        self.cancelled = 0
        self.delay_s = delay_s
        self.score_requests = _Method(self._score_requests)
        self.score_request = _Method(self._score_request)
        self.withdraw = _Method(self._withdraw)
        self.score_requests_streamed = _StreamMethod(lambda requests: self._score_requests(requests))

    def options(self, *, stream: bool = False):
        assert stream, "the coalescer streams merged calls"
        return self

    async def _score_requests(self, requests):
        self.calls.append([(items, normalize) for items, normalize, _id in requests])
        self.ids = [request_id for _items, _normalize, request_id in requests]
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return [ValueError("boom") if items == ["boom"] else sum(items) for items, _normalize, _id in requests]

    async def _score_request(self, items, normalize):
        return (await self._score_requests([(items, normalize, None)]))[0]

    async def _withdraw(self, ids):
        self.withdrawn.append(ids)


async def test_requests_of_one_loop_turn_share_a_call_and_get_their_own_results():
    handle = LocalHandle()
    coalescer = RequestCoalescer(handle)
    results = await asyncio.gather(
        *(coalescer.submit([k, k], False) for k in range(10)), coalescer.submit(["boom"], True)
    )
    assert results[:10] == [2 * k for k in range(10)]
    assert isinstance(results[10], ValueError)
    assert len(handle.calls) == 1 and len(handle.calls[0]) == 11
    assert handle.calls[0][10] == (["boom"], True)


async def test_a_full_call_is_sent_at_once_and_later_requests_start_a_new_one():
    handle = LocalHandle()
    coalescer = RequestCoalescer(handle, max_items=4)
    results = await asyncio.gather(*(coalescer.submit([1, 1], False) for _ in range(5)))
    assert results == [2] * 5
    assert [len(call) for call in handle.calls] == [2, 2, 1]


async def test_a_window_merges_requests_that_arrive_apart():
    handle = LocalHandle()
    coalescer = RequestCoalescer(handle, window_s=0.05)

    async def later(k):
        await asyncio.sleep(0.01 * k)
        return await coalescer.submit([k], False)

    assert await asyncio.gather(*(later(k) for k in range(3))) == [0, 1, 2]
    assert len(handle.calls) == 1


async def test_a_request_that_leaves_is_withdrawn_and_the_others_keep_their_call():
    # Its items must not reach a forward pass, and nobody else loses their place: the call goes on.
    handle = LocalHandle(delay_s=0.2)
    coalescer = RequestCoalescer(handle)
    first = asyncio.ensure_future(coalescer.submit([1], False))
    second = asyncio.ensure_future(coalescer.submit([2], False))
    await asyncio.sleep(0.02)
    first.cancel()
    assert await second == 2
    assert handle.cancelled == 0
    assert handle.calls == [[([1], False), ([2], False)]]
    assert handle.withdrawn == [handle.ids[:1]]
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_requests_that_leave_together_are_withdrawn_in_one_call():
    handle = LocalHandle(delay_s=0.2)
    coalescer = RequestCoalescer(handle)
    tasks = [asyncio.ensure_future(coalescer.submit([k], False)) for k in range(3)]
    await asyncio.sleep(0.02)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0)  # the withdraw call is sent on the next loop turn
    assert handle.withdrawn == [handle.ids] and len(set(handle.ids)) == 3
    assert handle.cancelled == 0 and len(handle.calls) == 1


async def test_with_several_replicas_a_flush_splits_into_one_call_per_shared_prefix():
    # Behind the affinity router (several replicas), the requests of prompt A go in one call and prompt B's in
    # another, so the router can send each where its prompt is; a request sharing nothing goes alone; leaving
    # withdraws within each call.
    handle = LocalHandle(delay_s=0.2)
    coalescer = RequestCoalescer(handle, split_by_prefix=True)
    prompt_a, prompt_b = "a" * 300, "b" * 300

    def item(prompt, k):
        return {"prompt": prompt, "response": f"answer {k}"}

    tasks = [
        asyncio.ensure_future(coalescer.submit([item(p, k)], False)) for k in range(3) for p in (prompt_a, prompt_b)
    ]
    tasks.append(asyncio.ensure_future(coalescer.submit([item("c" * 300, 0)], False)))
    await asyncio.sleep(0.02)
    tasks[0].cancel(), tasks[1].cancel()  # one request of each prompt leaves
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0)
    prompts = sorted(sorted(items[0]["prompt"][0] for items, _ in call) for call in handle.calls)
    assert prompts == [["a"] * 3, ["b"] * 3, ["c"]]
    assert len(handle.withdrawn) == 2 and all(len(ids) == 1 for ids in handle.withdrawn)


def test_only_a_model_behind_the_affinity_router_with_several_replicas_splits_by_prefix():
    def splits(**settings) -> bool:
        config = ServerConfig(**settings)
        return splits_by_prefix(config, config.served_models()[0])

    assert not splits()
    assert splits(replicas=2)
    assert splits(autoscaling={"max_replicas": 3})
    assert not splits(replicas=2, routing={"policy": "power_of_two"})


async def test_a_failed_call_fails_each_request_in_it():
    class Dead(LocalHandle):
        async def _score_requests(self, requests):
            raise ConnectionError("replica died")

    coalescer = RequestCoalescer(Dead())
    results = await asyncio.gather(coalescer.submit([1], False), coalescer.submit([2], False), return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionError, ConnectionError]


async def test_requests_that_left_before_the_call_was_sent_are_not_in_it():
    handle = LocalHandle()
    coalescer = RequestCoalescer(handle, window_s=0.05)
    gone = asyncio.ensure_future(coalescer.submit([1], False))
    stays = asyncio.ensure_future(coalescer.submit([2], False))
    await asyncio.sleep(0.01)
    gone.cancel()
    assert await stays == 2
    assert handle.calls == [[([2], False)]]
