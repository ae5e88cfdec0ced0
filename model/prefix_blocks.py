"""Prefixes remembered in whole blocks: one digest per block, of everything up to the block's end, kept in a bounded
LRU. The engine's ``caches.SeenPrefixes`` (token ids) and the prefix-affinity router's ``PrefixTable`` (text) both
remember prefixes this way.

A sequence's keys are recorded together, its first block last, so the keys an LRU holds of any sequence form a
prefix of its keys (the first block is the last one forgotten): ``held`` finds its length by bisection.

Example::

    table = BlockLRU(max_blocks=1024)
    table.record(chained_digests([b"abcd", b"efgh"], size=8), "replica-1")
    table.held(chained_digests([b"abcd", b"wxyz"], size=8))   # 1: the first block
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

V = TypeVar("V")


def chained_digests(blocks: Iterable[bytes], size: int) -> list[bytes]:
    """One key per block: a ``size``-byte digest of all the blocks up to and including it."""
    digest, keys = hashlib.blake2b(digest_size=size), []
    for block in blocks:
        digest.update(block)
        keys.append(digest.copy().digest())
    return keys


class BlockLRU(Generic[V]):
    """Block keys and a value each (the replica that holds them, or nothing), the ``max_blocks`` most recent."""

    def __init__(self, max_blocks: int):
        self.max_blocks = max_blocks
        self._values: OrderedDict[bytes, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: bytes) -> V | None:
        return self._values.get(key)

    def record(self, keys: Sequence[bytes], value: V) -> None:
        """Remember a sequence's keys with ``value``, its first block the last to be forgotten."""
        for key in reversed(keys):
            self._values[key] = value
            self._values.move_to_end(key)
        while len(self._values) > self.max_blocks:
            self._values.popitem(last=False)

    def held(self, keys: Sequence[bytes]) -> int:
        """How many leading keys of a sequence are held."""
        lo, hi = 0, len(keys)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if keys[mid - 1] in self._values:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def forget(self, value: V) -> None:
        """Drop every key recorded with ``value``."""
        for key in [k for k, v in self._values.items() if v == value]:
            del self._values[key]

    def clear(self) -> None:
        self._values.clear()
