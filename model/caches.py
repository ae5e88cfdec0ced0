"""The two bounded caches of the scoring engine: prefix key/value states, and rewards of exact duplicates.

``PrefixKVCache`` is a radix tree over token ids. Each node holds one run of tokens and the keys and values
every layer computed for them (one tensor ``[layers, 2, kv_heads, tokens, head_dim]``); a path from the root
spells a token prefix whose states are all known. ``match(ids)`` finds how much of a sequence is known, so
the engine runs only the rest. Samples of a GRPO group that arrive in different batches, or a system prompt
shared by every request, are computed once. The tree is bounded by bytes: after each batch, leaves are
dropped least recently used first until it fits. Two sequences meet in the tree only where their token ids
are equal, so a tokenizer that merges across the prompt/response boundary can cost a hit, never a reward.

``SeenPrefixes`` remembers the token prefixes of recently scored sequences (hashes of whole blocks), so the engine
keeps an item's states only as far as an earlier item shared them: items that share nothing copy nothing into the
tree. It also remembers where each sequence's states still lie: ``RecentForwards`` holds the keys and values of the
last few forwards by reference (no copy; bounded by bytes), so when a second item shares a prompt with one scored
in an earlier batch, the engine copies that prompt's states out of the earlier forward into the tree
(``ScoringEngine`` "promotes" them) instead of computing the prompt again.

``RewardCache`` answers an exact duplicate (the same token ids, hence the same reward; for ``StepIds`` the same ids
and readouts, hence the same step rewards; for ``LabelIds`` the same ids and labels) without a forward; it keeps a
digest of the ids, not the ids, and the most recently used ``max_items``.

Example::

    cache = PrefixKVCache(max_bytes=2**30)
    cache.insert(ids, start=0, kv=kv_of_ids)     # states of ids[0:len(kv)]
    known, segments = cache.match(other_ids)     # other_ids[:known] are cached; segments to concatenate
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .planning import LabelIds, Reward, StepIds, common_prefix_length
from .prefix_blocks import BlockLRU, chained_digests

SEQ_DIM = 3  # the token dimension of a node's [layers, 2, kv_heads, tokens, head_dim] tensor


@dataclass(eq=False)
class _Node:
    tokens: tuple[int, ...]
    kv: torch.Tensor | None  # None only at the root
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)
    last_used: int = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.kv is None else self.kv.numel() * self.kv.element_size()


class PrefixKVCache:
    """Keys and values of recently scored token prefixes, in a radix tree bounded by ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.nodes = 0
        self.evicted_bytes = 0
        self._root = _Node((), None, None)
        self._clock = itertools.count(1)

    def match(self, ids: Sequence[int], limit: int | None = None) -> tuple[int, list[torch.Tensor]]:
        """How many leading tokens of ``ids`` (at most ``limit``) have cached states, and those states as
        segments to concatenate along the token dimension. Marks the path as recently used."""
        limit = len(ids) if limit is None else min(limit, len(ids))
        node, pos, segments = self._root, 0, []
        now = next(self._clock)
        while pos < limit:
            child = node.children.get(ids[pos])
            if child is None:
                break
            take = _common_length(child.tokens, ids, pos, limit)
            child.last_used = now
            segments.append(child.kv if take == len(child.tokens) else child.kv.narrow(SEQ_DIM, 0, take))
            pos += take
            if take < len(child.tokens):
                break
            node = child
        return pos, segments

    def known(self, ids: Sequence[int], limit: int | None = None) -> int:
        """``match``'s length alone, without touching recency (for cost estimates)."""
        limit = len(ids) if limit is None else min(limit, len(ids))
        node, pos = self._root, 0
        while pos < limit:
            child = node.children.get(ids[pos])
            if child is None:
                break
            take = _common_length(child.tokens, ids, pos, limit)
            pos += take
            if take < len(child.tokens):
                break
            node = child
        return pos

    def insert(self, ids: Sequence[int], start: int, kv: torch.Tensor) -> None:
        """Store the states ``kv`` of ``ids[start:start + kv.shape[3]]``; ``ids[:start]`` must be cached already
        (it is: the engine inserts what it computed on top of what it matched)."""
        end = start + kv.shape[SEQ_DIM]
        node, pos = self._root, 0
        now = next(self._clock)
        while pos < end:
            child = node.children.get(ids[pos])
            if child is None:
                if pos < start:  # the prefix was evicted meanwhile: nothing to hang the states on
                    return
                self._add(node, tuple(ids[pos:end]), kv.narrow(SEQ_DIM, pos - start, end - pos), now)
                return
            take = _common_length(child.tokens, ids, pos, end)
            if take < len(child.tokens):
                child = self._split(child, take)
            child.last_used = now
            pos += take
            node = child

    def evict_to_budget(self, reserved: int = 0) -> None:
        """Drop least recently used leaves until the tree holds at most ``max_bytes - reserved`` (``reserved``: what
        the held forwards, ``RecentForwards``, take of the same budget)."""
        budget = self.max_bytes - reserved
        if self.bytes <= budget:
            return
        leaves = sorted((n for n in self._walk() if not n.children), key=lambda n: n.last_used)
        while self.bytes > budget and leaves:
            leaf = leaves.pop(0)
            parent = leaf.parent
            self._remove(leaf)
            if parent is not self._root and not parent.children:  # the parent became a leaf: keep LRU order
                _insort_by_use(leaves, parent)

    def clear(self) -> None:
        for child in list(self._root.children.values()):
            for node in _subtree(child):
                self.bytes -= node.nbytes
                self.nodes -= 1
        self._root.children.clear()

    # -- internals ----------------------------------------------------------------------------------
    def _add(self, parent: _Node, tokens: tuple[int, ...], kv: torch.Tensor, now: int) -> None:
        node = _Node(tokens, kv.clone(), parent, last_used=now)  # its own memory, not a view of a batch
        parent.children[tokens[0]] = node
        self.bytes += node.nbytes
        self.nodes += 1

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut ``node`` after ``at`` tokens; returns the head (its own copy of the states, so that evicting
        either part frees memory)."""
        head_kv = node.kv.narrow(SEQ_DIM, 0, at).clone()
        tail_kv = node.kv.narrow(SEQ_DIM, at, len(node.tokens) - at).clone()
        head = _Node(node.tokens[:at], head_kv, node.parent, last_used=node.last_used)
        node.parent.children[head.tokens[0]] = head
        self.bytes -= node.nbytes
        node.tokens, node.kv, node.parent = node.tokens[at:], tail_kv, head
        head.children[node.tokens[0]] = node
        self.bytes += head.nbytes + node.nbytes
        self.nodes += 1
        return head

    def _remove(self, leaf: _Node) -> None:
        del leaf.parent.children[leaf.tokens[0]]
        self.bytes -= leaf.nbytes
        self.evicted_bytes += leaf.nbytes
        self.nodes -= 1

    def _walk(self):
        for child in self._root.children.values():
            yield from _subtree(child)


def _subtree(node: _Node):
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(n.children.values())


def _insort_by_use(leaves: list[_Node], node: _Node) -> None:
    k = 0
    while k < len(leaves) and leaves[k].last_used <= node.last_used:
        k += 1
    leaves.insert(k, node)


def _common_length(tokens: tuple[int, ...], ids: Sequence[int], pos: int, limit: int) -> int:
    """Length of the common start of ``tokens`` and ``ids[pos:limit]``."""
    n = min(len(tokens), limit - pos)
    if tuple(ids[pos : pos + n]) == tokens[:n]:
        return n
    lo, hi = 0, n  # binary search on equal slices: C-speed comparisons instead of a Python loop per token
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tuple(ids[pos : pos + mid]) == tokens[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def token_digest(ids: Sequence[int]) -> bytes:
    """A 128-bit digest of a token-id sequence (the reward cache's key); a ``StepIds``'s readouts and a ``LabelIds``'s
    labels and normalisation are part of it."""
    digest = hashlib.blake2b(array("q", ids).tobytes(), digest_size=16)
    if isinstance(ids, StepIds):
        digest.update(b"readouts")
        digest.update(array("q", ids.readouts).tobytes())
    elif isinstance(ids, LabelIds):
        digest.update(b"labels/vocabulary" if ids.whole_vocabulary else b"labels/softmax")
        digest.update(array("q", ids.labels).tobytes())
    return digest.digest()


@dataclass(eq=False)
class HeldForward:
    """Every layer's keys and values from one forward (``[rows, kv_heads, columns, head_dim]`` each: the cached
    columns ``[0, cached_width)``, then the new ones), held by reference; ``layers`` is None once let go."""

    layers: list[tuple[torch.Tensor, torch.Tensor]] | None
    cached_width: int
    nbytes: int


@dataclass(eq=False)
class HeldRow:
    """Where one row's states lie in a held forward: ``seq[:start]`` at columns ``[0, start)`` (what the row read
    from the cache), ``seq[start:]`` from column ``cached_width + first`` on."""

    forward: HeldForward
    seq: Sequence[int]
    row: int
    start: int
    first: int

    @property
    def alive(self) -> bool:
        return self.forward.layers is not None

    def states(self, lo: int, hi: int) -> torch.Tensor:
        """A copy of the states of ``seq[lo:hi]``, shaped as the tree holds them: ``[layers, 2, kv_heads, hi - lo,
        head_dim]``."""
        columns = []
        if lo < self.start:
            columns.append((lo, min(hi, self.start)))
        if hi > self.start:
            shift = self.forward.cached_width + self.first - self.start
            columns.append((max(lo, self.start) + shift, hi + shift))
        return torch.stack(
            [
                torch.stack([torch.cat([t[self.row, :, a:b] for a, b in columns], dim=1) for t in pair])
                for pair in self.forward.layers
            ]
        )


class RecentForwards:
    """The keys and values of the most recent forwards, by reference, at most ``max_bytes`` of them: the oldest is let
    go first. A forward larger than the whole budget is not held. A forward's size is that of the memory its tensors
    keep alive: a view (values sliced from a fused QKV projection) holds all of its storage."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._held: deque[HeldForward] = deque()

    def hold(self, layers: list[tuple[torch.Tensor, torch.Tensor]], cached_width: int) -> HeldForward | None:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for pair in layers for t in pair}
        nbytes = sum(storages.values())
        if nbytes > self.max_bytes:
            return None
        while self._held and self.bytes + nbytes > self.max_bytes:
            self._let_go(self._held.popleft())
        held = HeldForward(list(layers), cached_width, nbytes)
        self._held.append(held)
        self.bytes += nbytes
        return held

    def clear(self) -> None:
        while self._held:
            self._let_go(self._held.popleft())

    def _let_go(self, held: HeldForward) -> None:
        held.layers = None
        self.bytes -= held.nbytes


class SeenPrefixes:
    """The prefixes of recently scored token-id sequences, in whole blocks of ``BLOCK`` tokens: ``shared(ids)`` is how
    many leading tokens of ``ids`` (whole blocks) some recorded sequence began with. Each block's key is a digest of
    the ids up to its end; the most recently recorded ``max_blocks`` keys are kept, each with where the states of
    the sequence that last recorded it lie (``HeldRow``), if they are still held: ``held(ids)``.

    Example::

        seen = SeenPrefixes()
        seen.add(prompt + response_1, where)
        seen.shared(prompt + response_2)   # len(prompt) rounded down to whole blocks
        seen.held(prompt + response_2)     # (len(prompt), where): those tokens' states lie in ``where``
    """

    BLOCK = 16

    RECENT_KEYS = 512  # sequences whose block keys are remembered (a batch asks for each one's several times)

    def __init__(self, max_blocks: int = 1 << 16):
        self._blocks: BlockLRU[HeldRow | None] = BlockLRU(max_blocks)
        self._recent: OrderedDict[bytes, list[bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def shared(self, ids: Sequence[int]) -> int:
        return self._blocks.held(self._block_keys(ids)) * self.BLOCK

    def held(self, ids: Sequence[int], limit: int) -> tuple[int, HeldRow | None]:
        """How many leading tokens of ``ids`` (at most ``limit``) a held forward computed, and where they lie: the
        sequence that last recorded ``ids``' deepest shared block, compared token by token (a digest is not
        trusted)."""
        keys = self._block_keys(ids)[: limit // self.BLOCK]  # a prefix's keys are the first of the whole's
        blocks = self._blocks.held(keys)
        where = self._blocks.get(keys[blocks - 1]) if blocks else None
        if where is None or not where.alive:
            return 0, None
        return min(common_prefix_length(where.seq, ids), limit), where

    def add(self, ids: Sequence[int], where: HeldRow | None = None) -> None:
        self._blocks.record(self._block_keys(ids), where)

    def clear(self) -> None:
        self._blocks.clear()
        self._recent.clear()

    def _block_keys(self, ids: Sequence[int]) -> list[bytes]:
        """The chained digest of each whole block of ``ids`` (planning, keeping and recording one batch ask for the
        same sequence's three times: the last ``RECENT_KEYS`` sequences' are remembered)."""
        raw = array("q", ids).tobytes()
        keys = self._recent.get(raw)
        if keys is None:
            step = self.BLOCK * 8
            keys = chained_digests((raw[end - step : end] for end in range(step, len(raw) + 1, step)), size=8)
            self._recent[raw] = keys
            if len(self._recent) > self.RECENT_KEYS:
                self._recent.popitem(last=False)
        return keys


class RewardCache:
    """Rewards of recently scored token-id sequences, the most recently used ``max_items`` of them."""

    def __init__(self, max_items: int):
        self.max_items = max_items
        self._rewards: OrderedDict[bytes, Reward] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rewards)

    def get(self, key: bytes) -> Reward | None:
        reward = self._rewards.get(key)
        if reward is not None:
            self._rewards.move_to_end(key)
        return reward

    def peek(self, key: bytes) -> Reward | None:
        """The reward cached for ``key``, without touching recency (for plans and cost estimates)."""
        return self._rewards.get(key)

    def contains(self, key: bytes) -> bool:
        """Whether ``key`` is cached, without touching recency (for cost estimates)."""
        return key in self._rewards

    def put(self, key: bytes, reward: Reward) -> None:
        if self.max_items <= 0:
            return
        self._rewards[key] = reward
        self._rewards.move_to_end(key)
        while len(self._rewards) > self.max_items:
            self._rewards.popitem(last=False)

    def clear(self) -> None:
        self._rewards.clear()
