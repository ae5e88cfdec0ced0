"""Merging the Scorer calls of requests that reach a Gateway together into one handle call.

OpenRLHF and verl send one item per HTTP request from hundreds of workers. Each Ray handle call costs a few
milliseconds of CPU in the Gateway and in the Scorer replica, far more than scoring one short item, so the
Gateway collects the requests that are ready to call the Scorer in the same event-loop turn (or within
``window_s``) and sends them as ONE ``Scorer.score_requests_streamed`` call, each with its own request id. Each
request keeps its own result: its rewards, or its own error (a bad request never fails the others merged with it),
streamed back as soon as it is ready, so a request never waits for a slower one merged with it.

A request whose caller goes away (timeout, client disconnect) stops waiting at once and its id is sent to the
Scorer in a ``withdraw`` call (the ids of one event-loop turn together): the replica takes that request's waiting
items out of its queue, so they never reach a forward, and the other requests of the call keep their place.

A withdrawal must reach the replica that holds the request, and a handle call goes to whichever replica Serve's
router picks; so requests are merged only when the Scorer has one replica. With several, each request is its own
call and leaving cancels that call (Ray cancels it in the replica, which drops the request's waiting items).

Example::

    coalescer = RequestCoalescer(scorer_handle, window_s=0.0, max_items=256)
    result = await coalescer.submit(items, normalize=False)   # ScoredItems | RMServeError
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_REQUESTS_PER_CALL = 512  # keeps one call's size bounded


@dataclass(eq=False)
class _Member:
    """One request: its id, its ``(items, normalize)``, the future its caller awaits, and whether it was sent."""

    request_id: str
    items: Sequence[Any]
    normalize: bool
    future: asyncio.Future
    sent: bool = False


class RequestCoalescer:
    """Sends the requests pending in one event-loop turn (plus ``window_s``) as one ``score_requests`` call."""

    def __init__(self, scorer: Any, *, window_s: float = 0.0, max_items: int = 256, merge: bool = True):
        self.scorer = scorer
        self.window_s = window_s
        self.max_items = max_items
        self.merge = merge
        self._ids = (f"{secrets.token_hex(4)}:{n}" for n in itertools.count())  # unique across Gateway replicas
        self._pending: list[_Member] = []
        self._pending_items = 0
        self._flush_handle: asyncio.Handle | None = None
        self._withdrawals: list[str] = []

    async def submit(self, items: Sequence[Any], normalize: bool) -> Any:
        """This request's ``ScoredItems`` or ``RMServeError``, as ``Scorer.score_request`` would return it."""
        if not self.merge:
            return await self._call_alone(items, normalize)
        loop = asyncio.get_running_loop()
        if not self._pending:
            delay = self.window_s
            self._flush_handle = loop.call_later(delay, self._flush) if delay > 0 else loop.call_soon(self._flush)
        member = _Member(next(self._ids), items, normalize, loop.create_future())
        self._pending.append(member)
        self._pending_items += len(items)
        if self._pending_items >= self.max_items or len(self._pending) >= MAX_REQUESTS_PER_CALL:
            self._flush()
        try:
            return await asyncio.shield(member.future)
        except asyncio.CancelledError:
            self._leave(member)
            raise

    async def _call_alone(self, items: Sequence[Any], normalize: bool) -> Any:
        response = self.scorer.score_request.remote(items, normalize)
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()  # Ray cancels it in the replica, which drops the request's waiting items
            raise

    def _leave(self, member: _Member) -> None:
        member.future.cancel()  # its result, when it comes, is not wanted
        if not member.sent:  # still pending here: it never will be sent
            self._pending.remove(member)
            self._pending_items -= len(member.items)
            return
        if not self._withdrawals:  # one withdraw call for the requests that leave in this loop turn
            asyncio.get_running_loop().call_soon(self._send_withdrawals)
        self._withdrawals.append(member.request_id)

    def _send_withdrawals(self) -> None:
        ids, self._withdrawals = self._withdrawals, []
        asyncio.ensure_future(_settle(self.scorer.withdraw.remote(ids)))

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        members, self._pending, self._pending_items = self._pending, [], 0
        if members:
            for member in members:
                member.sent = True
            stream = self.scorer.options(stream=True).score_requests_streamed.remote(
                [(m.items, m.normalize, m.request_id) for m in members]
            )
            asyncio.ensure_future(self._deliver(members, stream))

    @staticmethod
    async def _deliver(members: list[_Member], stream: Any) -> None:
        """Hand each request its result as the replica streams it back (a request never waits for a slower one
        merged with it)."""
        try:
            async for index, result in stream:
                if not members[index].future.done():
                    members[index].future.set_result(result)
        except (Exception, asyncio.CancelledError) as exc:
            for member in members:  # e.g. the replica died: every request of the call still waiting sees it
                if not member.future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        member.future.cancel()
                    else:
                        member.future.set_exception(exc)
            return
        for member in members:  # a stream that ended early (never expected): nobody waits forever
            if not member.future.done():
                member.future.set_exception(RuntimeError("the Scorer's stream ended without this request's result"))


async def _settle(response: Any) -> None:
    """Await a fire-and-forget call so its failure (the replica is gone, and the request with it) is not reported."""
    with contextlib.suppress(Exception):
        await response
