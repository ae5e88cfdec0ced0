"""Prefix-affinity routing: Scorer calls whose items share a prompt go to the replica that already computed it.

Prefix sharing (``model/planning.py``) computes a prompt once per replica: in one batch, and across batches through
the replica's prefix KV cache. Serve's default router (power of two choices) spreads the n samples of a GRPO group
over the replicas, so with N replicas each computes the prompt again. ``PrefixAffinityRouter`` plugs into Ray
Serve's own request-router extension point (``RequestRouterConfig(request_router_class=...)``; it runs in each
caller's process, e.g. every Gateway replica) and sends a call to the replica whose earlier calls share the
longest prefix with it, unless that replica holds ``imbalance_items`` more items than the least-loaded one: then,
as for a prompt seen nowhere yet, the least-loaded replica takes it.

The prefix is read off the call's text (``call_text``: the first item's prompt and response, chat turns and token
ids included) in blocks of ``BLOCK_CHARS`` characters, each block's key a hash of the text up to its end
(``PrefixTable``, an LRU of block keys). Matching on text, not tokens, keeps routing out of the tokenizer and works
for the compatibility routes' pre-formatted queries, where the prompt is not marked. A match counts when it covers
at least ``min_match`` of the call's text: a shared chat-template header alone does not tie unrelated prompts.

``withdraw`` calls (a Gateway taking back the requests of callers that left) go to the replica that holds those
requests, so a Gateway can merge requests into one call whatever the number of replicas; the Gateway's coalescer
merges only requests that share a prefix (``prefix_clusters``), so a call's first text speaks for all of it.

A call goes to its chosen replica alone the first time (a busy replica answers Serve's queue-length probe late, and
the call should wait for it rather than go where the prompt is not); a call Serve routes again (that replica
refused it or did not answer) is offered the other replicas after it, so a replica that stopped answering holds a
call back one backoff, as Serve's own router would, not until the health check removes it.

The policy (``AffinityPolicy``) is plain Python, testable without Ray::

    policy = AffinityPolicy(imbalance_items=256)
    policy.choose(["r1", "r2"], ["<prompt><response 1>"], items=1, call="c1")   # 'r1' (both idle: a hash picks)
    policy.choose(["r1", "r2"], ["<prompt><response 2>"], items=1, call="c2")   # 'r1' again: same prompt
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from rmserve.model.prefix_blocks import BlockLRU, chained_digests

BLOCK_CHARS = 64  # characters per prefix block: a match is counted in whole blocks
MAX_BLOCKS = 1 << 18  # prefix blocks remembered per router (LRU): 16 M characters of text, about 10 MB
MIN_MATCH = 0.1  # the share of a call's text a match must cover to count
IMBALANCE_ITEMS = 256  # default: items in flight one replica may hold beyond the least-loaded before affinity yields
_TEXT_CHARS = 1 << 14  # only the first 16 K characters of an item are read for routing (256 blocks)
# The Scorer methods whose first argument is a list of items, and those whose first argument is a merged call's
# requests, each ``(items, normalize, request_id)``.
_ITEMS_METHODS = frozenset({"score", "score_request"})
_REQUESTS_METHODS = frozenset({"score_requests", "score_requests_streamed"})


def item_text(item: Any) -> str:
    """The text an item's prefix is read from: prompt then response (or steps), chat turns, formatted text or token
    ids."""
    fields = item.__dict__ if hasattr(item, "__dict__") and not isinstance(item, dict) else item
    if not isinstance(fields, dict):
        return ""
    if "input_ids" in fields:
        return ",".join(map(str, list(fields["input_ids"])[: _TEXT_CHARS // 4]))
    if "text" in fields:
        return str(fields["text"])[:_TEXT_CHARS]
    turns = fields.get("messages") or fields.get("prompt") or ""
    if isinstance(turns, list):
        turns = "".join(f"<{_field(t, 'role')}>{_field(t, 'content')}" for t in turns)
    response = fields.get("response")
    if response is None and fields.get("steps") is not None:  # a process reward model's item: its steps
        response = "<step>".join(fields["steps"])
    return (f"{turns}<response>{response}" if response is not None else str(turns))[:_TEXT_CHARS]


def _field(obj: Any, name: str) -> Any:
    return obj.get(name, "") if isinstance(obj, dict) else getattr(obj, name, "")


def call_requests(method: str, args: Sequence[Any]) -> list[tuple[Sequence[Any], str | None]]:
    """``(items, request_id)`` of each request a Scorer call carries ([] for other methods)."""
    if not args:
        return []
    if method in _ITEMS_METHODS:
        return [(args[0], None)]
    if method in _REQUESTS_METHODS:
        return [(request[0], request[2] if len(request) > 2 else None) for request in args[0]]
    return []


class PrefixTable:
    """Which replica last received each text prefix, in blocks of ``BLOCK_CHARS`` (an LRU of ``max_blocks``)."""

    def __init__(self, max_blocks: int = MAX_BLOCKS):
        self._owner: BlockLRU[str] = BlockLRU(max_blocks)

    @staticmethod
    def keys(text: str) -> list[bytes]:
        """One key per whole block: a digest of the text up to the block's end."""
        ends = range(BLOCK_CHARS, len(text) + 1, BLOCK_CHARS)
        return chained_digests((text[end - BLOCK_CHARS : end].encode("utf-8", "surrogatepass") for end in ends), 12)

    def match(self, keys: Sequence[bytes], replicas: Sequence[str]) -> tuple[str | None, int]:
        """The replica among ``replicas`` holding the longest prefix of ``keys``, and how many blocks it holds."""
        allowed = set(replicas)
        for blocks in range(self._owner.held(keys), 0, -1):  # the longest held prefix whose owner is a candidate
            owner = self._owner.get(keys[blocks - 1])
            if owner in allowed:
                return owner, blocks
        return None, 0

    def insert(self, keys: Sequence[bytes], replica: str) -> None:
        self._owner.record(keys, replica)

    def forget(self, replica: str) -> None:
        self._owner.forget(replica)

    def __len__(self) -> int:
        return len(self._owner)


def _locked(method):
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return run


class AffinityPolicy:
    """Chooses a replica per call: the longest shared prefix, within ``imbalance_items`` of the least-loaded.

    One policy serves one Scorer deployment in one process: its router routes with it (``choose``). Serve runs the
    router on its own event-loop thread, so every method holds the policy's lock.
    """

    def __init__(
        self, imbalance_items: int = IMBALANCE_ITEMS, min_match: float = MIN_MATCH, max_blocks: int = MAX_BLOCKS
    ):
        self.imbalance_items = imbalance_items
        self.min_match = min_match
        self.table = PrefixTable(max_blocks)
        self.replicas: list[str] = []  # the live replicas, as the router last saw them
        self.load: dict[str, int] = {}  # items in flight per replica (calls this policy routed)
        self._calls: dict[str, tuple[str, int]] = {}  # call -> (replica, items)
        self._holder: dict[str, str] = {}  # request id -> replica, while its call runs
        self._call_requests: dict[str, list[str]] = {}
        self.affine = self.balanced = 0  # decisions made on a shared prefix / on load alone
        self._lock = threading.RLock()

    @_locked
    def pick(
        self, replicas: Sequence[str], text: str, load: dict[str, int] | None = None, keys: list[bytes] | None = None
    ) -> tuple[str, bool]:
        """The replica for ``text`` (its block ``keys``, when the caller has them) and whether a shared prefix chose
        it; nothing is recorded."""
        load = self.load if load is None else load
        keys = self.table.keys(text) if keys is None else keys
        owner, blocks = self.table.match(keys, replicas)
        least = min(replicas, key=lambda r: (load.get(r, 0), _rendezvous(r, keys[:1] or [text.encode()])))
        if (
            owner is not None
            and blocks * BLOCK_CHARS >= self.min_match * len(text)
            and load.get(owner, 0) - load.get(least, 0) <= self.imbalance_items
        ):
            return owner, True
        return least, False

    @_locked
    def routed_before(self, call: str) -> bool:
        """Was ``call`` routed already (and is Serve routing it again because its replica refused it)?"""
        return call in self._calls

    @_locked
    def choose(
        self,
        replicas: Sequence[str],
        texts: Sequence[str],
        items: int,
        call: str,
        request_ids: Sequence[str | None] = (),
    ) -> str:
        """The replica for a call (chosen by its first request's text), recorded as in flight until
        ``finished(call)`` and as holding every request's prefix (``texts``: each request's first item's)."""
        keys = [self.table.keys(text) for text in texts]  # each text hashed once
        chosen, affine = self.pick(replicas, texts[0] if texts else "", keys=keys[0] if keys else None)
        if affine:
            self.affine += 1
        else:
            self.balanced += 1
        for text_keys in keys:
            self.table.insert(text_keys, chosen)
        self.finished(call)  # a call routed again (its replica refused it) counts once
        self._calls[call] = (chosen, items)
        self.load[chosen] = self.load.get(chosen, 0) + items
        ids = [i for i in request_ids if i is not None]
        self._call_requests[call] = ids
        for request_id in ids:
            self._holder[request_id] = chosen
        return chosen

    @_locked
    def holder(self, request_ids: Sequence[str], replicas: Sequence[str]) -> str | None:
        """The replica holding the first of ``request_ids`` that is still running somewhere in ``replicas``."""
        for request_id in request_ids:
            replica = self._holder.get(request_id)
            if replica in replicas:
                return replica
        return None

    @_locked
    def finished(self, call: str) -> None:
        replica, items = self._calls.pop(call, (None, 0))
        if replica is not None:
            self.load[replica] = max(0, self.load.get(replica, 0) - items)
        for request_id in self._call_requests.pop(call, []):
            self._holder.pop(request_id, None)

    @_locked
    def forget(self, replica: str) -> None:
        """A replica died: its prefixes are nowhere now."""
        self.table.forget(replica)
        self.load.pop(replica, None)


def prefix_clusters(texts: Sequence[str], min_match: float = MIN_MATCH) -> list[list[int]]:
    """Indices of ``texts`` in runs that share a prefix of at least a block and ``min_match`` of the longer text."""
    order = sorted(range(len(texts)), key=lambda i: texts[i])
    clusters: list[list[int]] = []
    for i in order:
        if clusters:
            prev = texts[clusters[-1][-1]]
            shared = len(os.path.commonprefix([prev, texts[i]]))
            if shared >= BLOCK_CHARS and shared >= min_match * max(len(prev), len(texts[i])):
                clusters[-1].append(i)
                continue
        clusters.append([i])
    return clusters


def _rendezvous(replica: str, keys: Sequence[bytes]) -> bytes:
    """Breaks load ties the same way in every router: a hash of the replica and the call's first block."""
    return hashlib.blake2b(replica.encode() + keys[0], digest_size=8).digest()


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve request router for Scorer deployments: ``AffinityPolicy`` over the live replicas.

    Configure it with ``RequestRouterConfig(request_router_class=PrefixAffinityRouter,
    request_router_kwargs={"imbalance_items": 256})``; ``build_app`` does for every Scorer deployment.
    """

    def initialize_state(self, imbalance_items: int = IMBALANCE_ITEMS, min_match: float = MIN_MATCH, **_: Any):
        self.policy = AffinityPolicy(imbalance_items=imbalance_items, min_match=min_match)
        self.policy.replicas = [replica_id.unique_id for replica_id in self.curr_replicas]

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        if hasattr(self, "policy"):
            self.policy.replicas = [r.replica_id.unique_id for r in replicas]

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is None or not candidate_replicas:
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True  # a refused choice waits before the next try
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        self.policy.replicas = list(by_id)  # also when Serve listed them before initialize_state
        method = pending_request.metadata.call_method
        if method == "withdraw":
            ids = pending_request.args[0] if pending_request.args else []
            holder = self.policy.holder(ids, list(by_id))
            # Nobody holds them any more (their call ended, or its replica died): any replica answers, doing nothing.
            return [[by_id[holder]]] if holder is not None else [candidate_replicas]
        requests = call_requests(method, pending_request.args)
        if not requests:
            return [candidate_replicas]
        call = pending_request.metadata.internal_request_id
        again = self.policy.routed_before(call)
        chosen = self.policy.choose(
            list(by_id),
            texts=[item_text(items[0]) for items, _ in requests if len(items)],
            items=sum(len(items) for items, _ in requests),
            call=call,
            request_ids=[request_id for _, request_id in requests],
        )
        # First try: the chosen replica alone (a late queue-length probe from a busy replica means a backoff, not a
        # replica without the prompt). Routed again: the others after it, so a replica that stopped answering
        # holds the call back one backoff, not until the health check removes it.
        if again:
            return [[by_id[chosen]], [r for r in candidate_replicas if r.replica_id.unique_id != chosen]]
        return [[by_id[chosen]]]

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.policy.finished(internal_request_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.policy.forget(replica_id.unique_id)
        self.policy.replicas = [replica.unique_id for replica in self.curr_replicas]
