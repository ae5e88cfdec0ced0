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

With several Scorer replicas behind the prefix-affinity router (``split_by_prefix``), a flush is sent as one call per
run of requests that share a prefix (``affinity.prefix_clusters``), so the router (``affinity.PrefixAffinityRouter``)
sends each run where its prompt was computed before; requests that share nothing go as calls of their own. The
router also sends each ``withdraw`` to the replica holding its requests (one withdraw call per merged call).

Example::

    coalescer = RequestCoalescer(scorer_handle, window_s=0.0, max_items=256, split_by_prefix=False)
    result = await coalescer.submit(items, normalize=False)   # ScoredItems | RMServeError
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rmserve.serve.config.served_models import ServedModel
from rmserve.serve.config.settings import ServerConfig
from rmserve.serve.rayserve.affinity import item_text, prefix_clusters

log = logging.getLogger("rmserve.serve")

MAX_REQUESTS_PER_CALL = 512  # keeps one call's size bounded


def splits_by_prefix(config: ServerConfig, model: ServedModel) -> bool:
    """Does a Gateway split its merged calls to ``model`` by prefix: when the prefix-affinity router may choose among
    several of its Scorer replicas."""
    several = model.replicas > 1 or (config.autoscaling is not None and config.autoscaling.max_replicas > 1)
    return several and config.routing.policy == "prefix_affinity"


@dataclass(eq=False)
class _Member:
    """One request: its id, its ``(items, normalize)``, the future its caller awaits, and whether it was sent."""

    request_id: str
    items: Sequence[Any]
    normalize: bool
    future: asyncio.Future
    sent: bool = False
    call: int = -1  # the merged call it was sent in


class RequestCoalescer:
    """Sends the requests pending in one event-loop turn (plus ``window_s``) as one streamed
    ``score_requests_streamed`` call per target replica (one call with a single replica)."""

    def __init__(self, scorer: Any, *, window_s: float = 0.0, max_items: int = 256, split_by_prefix: bool = False):
        self.scorer = scorer
        self.window_s = window_s
        self.max_items = max_items
        self.split_by_prefix = split_by_prefix
        self._calls = itertools.count()
        self._ids = (f"{secrets.token_hex(4)}:{n}" for n in itertools.count())  # unique across Gateway replicas
        self._pending: list[_Member] = []
        self._pending_items = 0
        self._flush_handle: asyncio.Handle | None = None
        self._withdrawals: dict[int, list[str]] = {}  # call -> ids of its requests whose callers left

    async def submit(self, items: Sequence[Any], normalize: bool) -> Any:
        """This request's ``ScoredItems`` or ``RMServeError``, as ``Scorer.score_request`` would return it."""
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

    def _leave(self, member: _Member) -> None:
        member.future.cancel()  # its result, when it comes, is not wanted
        if not member.sent:  # still pending here: it never will be sent
            self._pending.remove(member)
            self._pending_items -= len(member.items)
            return
        if not self._withdrawals:  # one withdraw call per merged call for the requests that leave in this loop turn
            asyncio.get_running_loop().call_soon(self._send_withdrawals)
        self._withdrawals.setdefault(member.call, []).append(member.request_id)

    def _send_withdrawals(self) -> None:
        calls, self._withdrawals = self._withdrawals, {}
        for ids in calls.values():
            asyncio.ensure_future(_settle(_apart(self.scorer.withdraw.remote, ids)))

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        members, self._pending, self._pending_items = self._pending, [], 0
        for group in self._split(members):
            call = next(self._calls)
            for member in group:
                member.sent, member.call = True, call
            requests = [(m.items, m.normalize, m.request_id) for m in group]
            stream = _apart(self.scorer.options(stream=True).score_requests_streamed.remote, requests)
            asyncio.ensure_future(self._deliver(group, stream))

    def _split(self, members: list[_Member]) -> list[list[_Member]]:
        """The merged calls: one, or (``split_by_prefix``) one per run of requests that share a prefix."""
        if not self.split_by_prefix or len(members) <= 1:
            return [members] if members else []
        texts = [item_text(m.items[0]) if len(m.items) else "" for m in members]
        return [[members[i] for i in run] for run in prefix_clusters(texts)]

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


def _apart(send: Any, *args: Any) -> Any:
    """Make a handle call outside the context of the HTTP request that happened to trigger it. Serve takes a call's
    request ids from the caller's context, and its router matches a routed call by that id: calls that share it
    (one per replica from one flush, a withdraw next to a call) could take each other's replica and leave one
    waiting forever."""
    return contextvars.Context().run(send, *args)


async def _settle(response: Any) -> None:
    """Await a fire-and-forget call so its failure (the replica is gone, and the request with it) is not reported."""
    with contextlib.suppress(Exception):
        await response
