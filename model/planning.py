"""What a batch costs and how the engine cuts it: prefix levels and micro-batches. No torch.

**Prefix levels.** Items of one batch that share a token-id prefix (a GRPO group's prompt, a system prompt
shared by all) need that prefix computed once. ``plan_levels`` sorts the unique sequences, reads the shared
prefixes off the longest common prefixes of neighbours (a radix tree, nested prefixes included), and keeps a
shared prefix only where it pays: ``(branches - 1) x (tokens it saves each)`` must reach ``min_shared_tokens``
(the per-forward overhead measured on the machine, in tokens). Level 0 runs first; a row of level k+1 reads
the keys and values its level-k prefix left in the engine's prefix cache. Tokens the cache already holds
(from earlier batches) are not computed again.

**Micro-batches.** Each level is cut into micro-batches by ``plan_microbatches``: exact dynamic programming
over the rows sorted by the tokens they compute, minimising padded tokens plus ``overhead_tokens`` per
forward, with every micro-batch's rows x (cached + new width) within the token budget (memory).

Example::

    levels = plan_levels(seqs, known=lambda ids, limit: 0, min_shared_tokens=64)
    cost = levels_cost(levels, max_batch_tokens=16384, overhead_tokens=64)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(eq=False)
class Row:
    """One row of a forward: tokens ``seq[start:end]`` computed on top of the cached ``seq[:start]``.

    ``item`` is the index of the sequence it scores (its last token's hidden state feeds the head), or None
    for a shared prefix whose keys and values are stored for the next level.
    """

    seq: Sequence[int]
    end: int
    start: int
    item: int | None
    past: list = field(default_factory=list)  # the cached states of seq[:start], set by the engine when it runs

    @property
    def new_tokens(self) -> int:
        return self.end - self.start


# What a cached token (keys and values a row attends to) weighs in the token budget, against one it computes: it
# costs no linear layers and little attention, but its keys and values occupy memory in the batch. Counted whole,
# suffix micro-batches behind a 1,000-token prompt would hold a dozen 200-token rows; measured on an H200 (8B
# shape, GRPO n = 8, budget 16,384), sharing then gained 2.2x where a 4x larger budget gave 3.5x. A micro-batch
# that still runs out of memory is split in half and retried.
CACHED_TOKEN_SHARE = 0.25

Known = Callable[[Sequence[int], int], int]  # (ids, limit) -> how many leading tokens are cached


def plan_levels(seqs: Sequence[Sequence[int]], known: Known, min_shared_tokens: float) -> list[list[Row]]:
    """Rows by level for unique, non-empty ``seqs``; every sequence gets exactly one item row."""
    n = len(seqs)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: tuple(seqs[i]))
    # shared[k]: tokens sequences order[k-1] and order[k] share, leaving each at least its last token to compute
    shared = [0] * n
    for k in range(1, n):
        a, b = seqs[order[k - 1]], seqs[order[k]]
        shared[k] = min(common_prefix_length(a, b), len(a) - 1, len(b) - 1)
    levels: list[list[Row]] = []

    def add(level: int, row: Row) -> None:
        while len(levels) <= level:
            levels.append([])
        levels[level].append(row)

    # An explicit stack instead of recursion: deep nesting must not hit Python's recursion limit.
    stack = [(0, n, 0, 0)]  # (lo, hi, base: tokens a computed ancestor covers, level)
    while stack:
        lo, hi, base, level = stack.pop()
        if hi - lo == 1:
            seq = seqs[order[lo]]
            add(level, Row(seq, len(seq), max(base, known(seq, len(seq) - 1)), order[lo]))
            continue
        depth = min(shared[lo + 1 : hi])
        cuts = [k for k in range(lo + 1, hi) if shared[k] == depth]
        ranges = list(zip([lo, *cuts], [*cuts, hi], strict=True))
        child_base, child_level = base, level
        if depth > base:
            prefix = seqs[order[lo]]
            cached = max(base, known(prefix, depth))
            if cached >= depth:  # an earlier batch left the whole prefix
                child_base = depth
            elif (len(ranges) - 1) * (depth - cached) >= min_shared_tokens:
                add(level, Row(prefix, depth, cached, None))
                child_base, child_level = depth, level + 1
        for r_lo, r_hi in reversed(ranges):
            stack.append((r_lo, r_hi, child_base, child_level))
    return levels


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if tuple(a[:n]) == tuple(b[:n]):
        return n
    lo, hi = 0, n  # binary search over slice equality (C-speed compares)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tuple(a[:mid]) == tuple(b[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_microbatches(
    sorted_lengths: Sequence[int],
    max_batch_tokens: int,
    overhead_tokens: float = 0,
    cached: Sequence[int] | None = None,
) -> list[tuple[int, int]]:
    """Cut rows sorted by computed length (ascending) into ``[start, end)`` runs.

    Minimises padded computed tokens plus ``overhead_tokens`` per micro-batch, exactly (contiguous runs of a
    sorted list are optimal for this cost). A run's rows x (longest computed + ``CACHED_TOKEN_SHARE`` x longest
    ``cached`` width) must fit ``max_batch_tokens``; a row over the budget gets a micro-batch of its own. The queue
    prices every batch it forms with this, so the inner loop over run starts is vectorised.
    """
    n = len(sorted_lengths)
    if n == 0:
        return []
    lengths = np.asarray(sorted_lengths, dtype=np.float64)
    widths = np.zeros(n) if cached is None else np.asarray(cached, dtype=np.float64)
    best = np.full(n + 1, np.inf)  # best[j]: cost of planning the first j rows
    best[0] = 0.0
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[j - 1]
        first = max(0, j - max(1, int(max_batch_tokens // max(longest, 1.0))))  # more rows never fit
        starts = np.arange(first, j)
        rows = j - starts
        widest = np.maximum.accumulate(widths[first:j][::-1])[::-1]  # widest cached width of rows start..j-1
        cost = best[first:j] + rows * longest + overhead_tokens
        cost[(rows > 1) & (rows * (longest + CACHED_TOKEN_SHARE * widest) > max_batch_tokens)] = np.inf
        k = int(np.argmin(cost))
        best[j], cut[j] = cost[k], first + k
    plans: list[tuple[int, int]] = []
    j = n
    while j > 0:
        plans.append((cut[j], j))
        j = cut[j]
    return plans[::-1]


def padded_tokens(lengths: Sequence[int]) -> int:
    """Tokens a padded batch of these lengths computes: rows x longest row."""
    return len(lengths) * max(lengths, default=0)


def plan_level(level: Sequence[Row], max_batch_tokens: int, overhead_tokens: float) -> list[list[Row]]:
    """A level's rows cut into micro-batches by ``plan_microbatches``, sorted by computed tokens, then cached width
    (rows left with nothing to compute are dropped)."""
    rows = sorted((r for r in level if r.start < r.end), key=lambda r: (r.new_tokens, r.start))
    lengths = [r.new_tokens for r in rows]
    plan = plan_microbatches(lengths, max_batch_tokens, overhead_tokens, [r.start for r in rows])
    return [rows[start:end] for start, end in plan]


def levels_cost(levels: Sequence[Sequence[Row]], max_batch_tokens: int, overhead_tokens: float) -> int:
    """Padded computed tokens plus per-forward overhead of running these levels: what a batch costs."""
    total = 0.0
    for level in levels:
        for chunk in plan_level(level, max_batch_tokens, overhead_tokens):
            total += padded_tokens([r.new_tokens for r in chunk]) + overhead_tokens
    return math.ceil(total)
