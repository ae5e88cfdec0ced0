"""Merging the Scorer calls of requests that reach a Gateway together into one handle call.

OpenRLHF and verl send one item per HTTP request from hundreds of workers. Each Ray handle call costs a few
milliseconds of CPU in the Gateway and in the Scorer replica, far more than scoring one short item, so the
Gateway collects the requests that are ready to call the Scorer in the same event-loop turn (or within
``window_s``) and sends them as ONE ``Scorer.score_requests`` call. Each request keeps its own result: its
rewards, or its own error (a bad request never fails the others merged with it).

A request whose caller goes away (timeout, client disconnect) stops waiting at once. Its items must not reach a
forward pass, and a Ray call can only be cancelled whole: so the call is cancelled in the replica (which drops the
items that have not started a forward) and the requests still waiting are sent again in a new call. Their rewards
are unchanged (scoring is deterministic); they lose their place in the queue, which only happens when a client
of the same merged call leaves.

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


@dataclass(eq=False)
class _Member:
    """One request: its ``(items, normalize)``, the future its caller awaits, and the call that carries it."""

    request: tuple[Sequence[Any], bool]
    future: asyncio.Future
    call: _Call | None = None


@dataclass(eq=False)
class _Call:
    """The requests merged into one handle call. ``replaced``: cancelled and its live requests sent again."""

    members: list[_Member] = field(default_factory=list)
    response: Any = None  # the DeploymentResponse once sent
    replaced: bool = False


class RequestCoalescer:
    """Sends the requests pending in one event-loop turn (plus ``window_s``) as one ``score_requests`` call."""

    def __init__(self, scorer: Any, *, window_s: float = 0.0, max_items: int = 256):
        self.scorer = scorer
        self.window_s = window_s
        self.max_items = max_items
        self._pending: list[_Member] = []
        self._pending_items = 0
        self._flush_handle: asyncio.Handle | None = None
        self.resent = 0  # requests sent again because another request of their call left

    async def submit(self, items: Sequence[Any], normalize: bool) -> Any:
        """This request's ``ScoredItems`` or ``RMServeError``, as ``Scorer.score_request`` would return it."""
        loop = asyncio.get_running_loop()
        if not self._pending:
            delay = self.window_s
            self._flush_handle = loop.call_later(delay, self._flush) if delay > 0 else loop.call_soon(self._flush)
        member = _Member((items, normalize), loop.create_future())
        self._pending.append(member)
        self._pending_items += len(items)
        if self._pending_items >= self.max_items or len(self._pending) >= MAX_REQUESTS_PER_CALL:
            self._flush()
        try:
            return await asyncio.shield(member.future)
        except asyncio.CancelledError:
            self._leave(member)
            raise

    def _leave(self, member: _Member) -> None:
        member.future.cancel()  # its result, when it comes, is not wanted
        call = member.call
        if call is None:  # not sent yet: it never will be
            self._pending.remove(member)
            self._pending_items -= len(member.request[0])
            return
        if call.replaced:
            return
        call.replaced = True
        call.response.cancel()  # the replica drops the items that have not started a forward
        # Next loop turn: other requests of the call that leave in this one (a trainer that gave up on a whole
        # step) are not sent again.
        asyncio.get_running_loop().call_soon(self._resend, call)

    def _resend(self, call: _Call) -> None:
        live = [m for m in call.members if not m.future.done()]
        if live:
            self.resent += len(live)
            self._send(live)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        members, self._pending, self._pending_items = self._pending, [], 0
        if members:
            self._send(members)

    def _send(self, members: list[_Member]) -> None:
        call = _Call(members)
        for member in members:
            member.call = call
        call.response = self.scorer.score_requests.remote([m.request for m in members])
        asyncio.ensure_future(self._deliver(call))

    @staticmethod
    async def _deliver(call: _Call) -> None:
        try:
            results = await call.response
        except (Exception, asyncio.CancelledError) as exc:
            if call.replaced:  # cancelled on purpose; its live requests wait on the call that replaced it
                return
            for member in call.members:  # e.g. the replica died: every request of the call sees it
                if not member.future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        member.future.cancel()
                    else:
                        member.future.set_exception(exc)
            return
        if call.replaced:
            return
        for member, result in zip(call.members, results, strict=True):
            if not member.future.done():
                member.future.set_result(result)
