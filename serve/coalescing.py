"""Merging the Scorer calls of requests that reach a Gateway together into one handle call.

OpenRLHF and verl send one item per HTTP request from hundreds of workers. Each Ray handle call costs a few
milliseconds of CPU in the Gateway and in the Scorer replica, far more than scoring one short item, so the
Gateway collects the requests that are ready to call the Scorer in the same event-loop turn (or within
``window_s``) and sends them as ONE ``Scorer.score_requests`` call. Each request keeps its own result: its
rewards, or its own error (a bad request never fails the others merged with it).

A request whose caller goes away (timeout, client disconnect) stops waiting at once; the shared call is
cancelled in the replica (dropping its queued items) only when every request merged into it has gone.

Example::

    coalescer = RequestCoalescer(scorer_handle, window_s=0.0, max_items=256)
    result = await coalescer.submit(items, normalize=False)   # ScoredItems | RMServeError
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_REQUESTS_PER_CALL = 512  # keeps one call's work spreadable across Scorer replicas


@dataclass
class _Call:
    """The requests merged into one handle call, and how many of them still wait for it."""

    futures: list[asyncio.Future] = field(default_factory=list)
    waiting: int = 0
    response: Any = None  # the DeploymentResponse once sent


@dataclass
class _Pending:
    requests: list[tuple[Sequence[Any], bool]] = field(default_factory=list)
    call: _Call = field(default_factory=_Call)
    items: int = 0


class RequestCoalescer:
    """Sends the requests pending in one event-loop turn (plus ``window_s``) as one ``score_requests`` call."""

    def __init__(self, scorer: Any, *, window_s: float = 0.0, max_items: int = 256):
        self.scorer = scorer
        self.window_s = window_s
        self.max_items = max_items
        self._pending: _Pending | None = None
        self._flush_handle: asyncio.Handle | None = None
        self.calls = 0  # handle calls sent
        self.requests = 0  # requests carried by them

    async def submit(self, items: Sequence[Any], normalize: bool) -> Any:
        """This request's ``ScoredItems`` or ``RMServeError``, as ``Scorer.score_request`` would return it."""
        loop = asyncio.get_running_loop()
        pending = self._pending
        if pending is None:
            pending = self._pending = _Pending()
            if self.window_s > 0:
                self._flush_handle = loop.call_later(self.window_s, self._flush)
            else:
                self._flush_handle = loop.call_soon(self._flush)
        future = loop.create_future()
        pending.requests.append((items, normalize))
        pending.call.futures.append(future)
        pending.call.waiting += 1
        pending.items += len(items)
        call = pending.call
        if pending.items >= self.max_items or len(pending.requests) >= MAX_REQUESTS_PER_CALL:
            self._flush()
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self._leave(call, future)
            raise

    @staticmethod
    def _leave(call: _Call, future: asyncio.Future) -> None:
        future.cancel()  # its result, when it comes, is not wanted
        call.waiting -= 1
        if call.waiting == 0 and call.response is not None:
            call.response.cancel()  # nobody waits for any of its requests: free the replica's queue

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        pending, self._pending = self._pending, None
        if pending is None:
            return
        call = pending.call
        if call.waiting == 0:  # every caller left before the call was sent
            return
        self.calls += 1
        self.requests += len(pending.requests)
        call.response = self.scorer.score_requests.remote(pending.requests)
        asyncio.ensure_future(self._deliver(call))

    @staticmethod
    async def _deliver(call: _Call) -> None:
        try:
            results = await call.response
        except asyncio.CancelledError:
            for future in call.futures:
                future.cancel()
            return
        except Exception as exc:  # e.g. the replica died: every request merged into the call sees it
            for future in call.futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for future, result in zip(call.futures, results, strict=True):
            if not future.done():
                future.set_result(result)
