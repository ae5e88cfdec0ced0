"""What a batch costs and how the engine cuts it: answers without a forward, prefix levels, micro-batches, and the
``BatchPlan`` that holds them. No torch.

**The plan.** ``plan_batch`` decides everything a batch will do before it runs: which items are answered by an
exact duplicate or the reward cache, which rows each level computes and from which cached token each row starts,
and how each level is cut into micro-batches. Its ``cost`` is the price a batching queue budgets with, and the
engine runs exactly that plan (``ScoringEngine.run``), so the price is what runs.

**Prefix levels.** Items of one batch that share a token-id prefix (a GRPO group's prompt, a system prompt
shared by all) need that prefix computed once. ``plan_levels`` sorts the unique sequences, reads the shared
prefixes off the longest common prefixes of neighbours (a radix tree, nested prefixes included), and keeps a
shared prefix only where it pays: ``(branches - 1) x (tokens it saves each)`` must reach ``min_shared_tokens``
(the per-forward overhead measured on the machine, in tokens). Level 0 runs first; a row of level k+1 starts
where its level-k prefix ends, on the keys and values that prefix left in the engine's prefix cache. Tokens the
cache already holds (from earlier batches) are not computed again. A stretch shorter than ``MIN_REUSED_TOKENS`` (a
chat template's first tokens, which every item shares) is computed in every row: reading it costs more than it
saves. Every row's start is fixed here.

**What outlives the batch.** Prefix rows always leave their states in the prefix cache. An item keeps its states
only as far as an earlier item shared its tokens (``keep``: the engine's ``SeenPrefixes``), so items that share
nothing (PPO traffic) copy nothing into the cache and leave it to the prompts that are reused. A GRPO group's first
sample, alone in its batch, keeps nothing, but ``known`` counts what a recent forward still holds (the engine copies
it into the cache before the batch runs), so the second sample does not compute the prompt again. A process reward
model's item (``StepIds``) keeps its states up to its first step separator from its first sighting: PRM traffic comes
as groups of solutions to one prompt, so the group's second sample does not compute the prompt again.

**Micro-batches.** Each level is cut into micro-batches by ``plan_microbatches``: exact dynamic programming
over the rows sorted by the tokens they compute, minimising padded tokens plus ``overhead_tokens`` per
forward, with every micro-batch's rows x (cached + new width) within the token budget (memory).

Example::

    plan = plan_batch(seqs, known=cache.known, cached_reward=None, keep=seen.shared,
                      max_batch_tokens=16384, overhead_tokens=64)
    plan.cost   # padded tokens + 64 x forwards: what the queue prices the batch at
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


class _ReadIds(tuple):
    """Token ids together with how they are read (``_reading``): equal only to ids of the same kind, read the same way
    (slices are plain tuples), so duplicates, the reward cache and the plan tell them apart."""

    def _reading(self) -> tuple:
        raise NotImplementedError

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and tuple.__eq__(self, other) and self._reading() == other._reading()

    def __ne__(self, other) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash((tuple(self), self._reading()))

    def __reduce__(self):
        return (type(self), (tuple(self), *self._reading()))


class StepIds(_ReadIds):
    """Token ids scored at several positions: the hidden state at each of ``readouts`` (ascending; a process reward
    model's step separators) feeds the head, instead of the last token's alone. Its outcome is one reward per
    readout. Equal only to ``StepIds`` with the same ids and the same readouts (slices are plain tuples).

    Example::

        StepIds([1, 5, 9, 2, 7, 2], readouts=(3, 5))   # rewards at the two separators (id 2)
    """

    readouts: tuple[int, ...]

    def __new__(cls, ids, readouts):
        seq = super().__new__(cls, ids)
        seq.readouts = tuple(readouts)
        ok = seq.readouts and list(seq.readouts) == sorted(set(seq.readouts))
        if not ok or not 0 <= seq.readouts[0] <= seq.readouts[-1] < len(seq):
            raise ValueError(f"readouts {seq.readouts} must be ascending positions of the {len(seq)} ids")
        return seq

    def _reading(self) -> tuple:
        return (self.readouts,)


class LabelIds(_ReadIds):
    """Token ids read at the last token by a causal LM's next-token probabilities of ``labels`` (a judge's verdict
    tokens, chosen per request): under the whole vocabulary (``whole_vocabulary``), or softmax over just those
    labels. Its outcome is one probability per label. Equal only to ``LabelIds`` with the same ids, labels and
    normalisation, so two requests with other labels on the same text never share an answer.

    Example::

        LabelIds([1, 5, 9], labels=(31, 32), whole_vocabulary=False)   # [P(31), P(32)], summing to 1
    """

    labels: tuple[int, ...]
    whole_vocabulary: bool

    def __new__(cls, ids, labels, whole_vocabulary):
        seq = super().__new__(cls, ids)
        seq.labels = tuple(int(t) for t in labels)
        seq.whole_vocabulary = bool(whole_vocabulary)
        if not seq.labels:
            raise ValueError("LabelIds needs at least one label")
        return seq

    def _reading(self) -> tuple:
        return (self.labels, self.whole_vocabulary)


def first_readout(seq: Sequence[int]) -> int:
    """The first position whose hidden state a sequence needs: its first readout, or its last token. A row that
    scores it must compute from there on (the tokens before may come from the prefix cache)."""
    return seq.readouts[0] if isinstance(seq, StepIds) else len(seq) - 1


def sequence_key(seq: Sequence[int]) -> tuple[int, ...]:
    """What identifies a sequence's outcome: its ids, and how they are read when that is not the last token's reward
    (``StepIds``' readouts, ``LabelIds``' labels)."""
    return seq if isinstance(seq, _ReadIds) else tuple(seq)


@dataclass(eq=False)
class Row:
    """One row of a forward: tokens ``seq[start:end]`` computed on top of the cached ``seq[:start]``.

    ``item`` is the index of the sequence it scores (its last token's hidden state feeds the head, or those at its
    readouts, ``StepIds``), or None for a shared prefix whose keys and values are stored for the next level.
    """

    seq: Sequence[int]
    end: int
    start: int
    item: int | None
    # The prefix row of this batch whose stored states ``seq[:start]`` runs on; None when the cache held them before
    # the batch. A row whose parent failed (out of memory alone, non-finite states) gets the parent's error.
    parent: Row | None = None
    store: bool = False  # keep the states it computes in the prefix cache (prefix rows always)
    store_end: int | None = None  # keep those of ``seq[start:store_end]`` only (None: all it computes)

    @property
    def stored_tokens(self) -> int:
        """How many of the tokens it computes go into the prefix cache."""
        if not self.store:
            return 0
        return (self.end if self.store_end is None else self.store_end) - self.start

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
Keep = Callable[[Sequence[int]], int]  # (ids) -> how many leading tokens an earlier item shared: worth keeping
# The shortest stretch of tokens a row reads from the prefix cache instead of computing (and so the shortest an item
# keeps there for later items). A row on cached states copies them into its forward and attends with an explicit
# mask instead of the causal kernel, which costs more than computing a few tokens: PPO traffic whose items share
# only a chat template's first 2 tokens, all read from the cache, ran 8 % slower than with sharing off (engine
# alone, bench-20M bf16, 60-item batches), while a shared 16-token system prompt already pays (3-5 % faster).
MIN_REUSED_TOKENS = 16
Reward = float | list[float]  # a sequence's outcome: one reward, or one per readout (``StepIds``)


def plan_levels(
    seqs: Sequence[Sequence[int]],
    known: Known,
    min_shared_tokens: float,
    *,
    keep: Keep | None = None,
    min_start: int = MIN_REUSED_TOKENS,
) -> list[list[Row]]:
    """Rows by level for unique, non-empty ``seqs``; every sequence gets exactly one item row (``keep``: its states
    are kept as far as an earlier item shared them, when that is at least ``min_start`` past its start). Each row
    starts after the tokens the cache holds now or an earlier level's prefix row leaves there, whichever is longer
    (what matching the cache when the row runs finds), when that is at least ``min_start`` tokens; a shorter stretch
    is computed again, and no prefix shorter than that gets a level."""
    n = len(seqs)

    def cached_start(seq: Sequence[int], limit: int) -> int:
        cached = known(seq, limit)
        return cached if cached >= min_start else 0

    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: tuple(seqs[i]))
    # shared[k]: tokens sequences order[k-1] and order[k] share, leaving each its first readout (the last token, or
    # its first step separator) and what follows to compute
    shared = [0] * n
    for k in range(1, n):
        a, b = seqs[order[k - 1]], seqs[order[k]]
        shared[k] = min(common_prefix_length(a, b), first_readout(a), first_readout(b))
    levels: list[list[Row]] = []

    def add(level: int, row: Row) -> Row:
        while len(levels) <= level:
            levels.append([])
        levels[level].append(row)
        return row

    # An explicit stack instead of recursion: deep nesting must not hit Python's recursion limit.
    # (lo, hi, base: tokens a computed ancestor or the cache covers, level, the prefix row that covers base or None)
    stack: list[tuple[int, int, int, int, Row | None]] = [(0, n, 0, 0, None)]
    while stack:
        lo, hi, base, level, parent = stack.pop()
        if hi - lo == 1:
            seq = seqs[order[lo]]
            cached = cached_start(seq, first_readout(seq))
            start, by = (base, parent) if base > cached else (cached, None)
            kept = min(keep(seq), len(seq)) if keep is not None else 0
            if keep is not None and isinstance(seq, StepIds):  # a PRM's samples come n to a prompt (GRPO)
                kept = max(kept, first_readout(seq))
            store = kept - start >= min_start
            add(level, Row(seq, len(seq), start, order[lo], by, store, kept if store else None))
            continue
        depth = min(shared[lo + 1 : hi])
        cuts = [k for k in range(lo + 1, hi) if shared[k] == depth]
        ranges = list(zip([lo, *cuts], [*cuts, hi], strict=True))
        child = (base, level, parent)
        if depth > base and depth >= min_start:
            prefix = seqs[order[lo]]
            cached = cached_start(prefix, depth)
            if cached >= depth:  # an earlier batch left the whole prefix
                child = (depth, level, None)
            elif (len(ranges) - 1) * (depth - max(base, cached)) >= min_shared_tokens:
                start, by = (base, parent) if base > cached else (cached, None)
                child = (depth, level + 1, add(level, Row(prefix, depth, start, None, by, True)))
        for r_lo, r_hi in reversed(ranges):
            stack.append((r_lo, r_hi, *child))
    return levels


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share (lists or tuples): 64-id slices compared at C speed, then id by id
    in the slice that differs (7x faster than a binary search over whole-prefix slices on 1,100-id GRPO items)."""
    n = min(len(a), len(b))
    k = 0
    while k < n and tuple(a[k : k + 64]) == tuple(b[k : k + 64]):
        k += 64
    end = min(k + 64, n)
    while k < end and a[k] == b[k]:
        k += 1
    return min(k, n)


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
    chunks = [chunk for level in levels for chunk in plan_level(level, max_batch_tokens, overhead_tokens)]
    return batch_cost(sum(padded_tokens([r.new_tokens for r in c]) for c in chunks), len(chunks), overhead_tokens)


def batch_cost(padded: int, forwards: int, overhead_tokens: float) -> int:
    """The one cost formula: padded tokens computed plus ``overhead_tokens`` per forward, rounded up."""
    return math.ceil(padded + forwards * overhead_tokens)


@dataclass(eq=False)
class BatchPlan:
    """Everything one batch will do, decided before it runs (``plan_batch``); ``ScoringEngine.run`` executes it.

    Outcomes go back in input order: ``computed[k]`` (scored by the item row with ``item == k``) answers the input
    positions ``places[k]``; each of ``answered`` is a sequence whose reward the reward cache held, with its
    positions; ``empty`` are positions of empty sequences (an error, no forward). ``microbatches[level]`` are the
    forwards of each level in run order, every row's cached start fixed. ``padded_tokens``, ``real_tokens`` and
    ``forwards`` are what running it computes, and ``cost`` the price of that (``batch_cost``).

    A plan reads the caches as they are when it is made: it is valid only until the engine next runs a batch or
    changes its caches (the engine refuses a stale plan). Plan and run under one hold of the engine's lock.
    """

    size: int  # sequences asked for, duplicates and cache hits included
    received_tokens: int  # their tokens
    computed: list[tuple[int, ...]]
    places: list[list[int]]
    answered: list[tuple[tuple[int, ...], Reward, list[int]]]
    empty: list[int]
    microbatches: list[list[list[Row]]]
    overhead_tokens: float
    padded_tokens: int = 0
    real_tokens: int = 0
    forwards: int = 0
    generation: int = 0  # which state of the engine's caches it read (set by the engine)

    def __post_init__(self) -> None:
        chunks = [chunk for level in self.microbatches for chunk in level]
        self.forwards = len(chunks)
        self.padded_tokens = sum(padded_tokens([r.new_tokens for r in chunk]) for chunk in chunks)
        self.real_tokens = sum(r.new_tokens for chunk in chunks for r in chunk)

    @property
    def cost(self) -> int:
        """Padded tokens plus per-forward overhead: what a batching queue budgets this batch at."""
        return batch_cost(self.padded_tokens, self.forwards, self.overhead_tokens)

    @property
    def items(self) -> list[Row]:
        """The rows that score a sequence (one per ``computed``), in run order."""
        return [r for level in self.microbatches for chunk in level for r in chunk if r.item is not None]

    @property
    def prefix_hits(self) -> int:
        """Items that start from cached keys and values (the rest are computed from their first token)."""
        return sum(r.start > 0 for r in self.items)

    @property
    def reward_cache_hits(self) -> int:
        """Items answered without a forward: duplicates within the batch and cached rewards."""
        return self.size - len(self.empty) - len(self.computed)


def plan_batch(
    sequences: Sequence[Sequence[int]],
    *,
    known: Known | None,
    cached_reward: Callable[[tuple[int, ...]], Reward | None] | None,
    keep: Keep | None,
    max_batch_tokens: int,
    overhead_tokens: float,
) -> BatchPlan:
    """The plan of one batch. ``known``: how much of a sequence the prefix cache holds (None: no prefix sharing,
    every row whole); ``cached_reward``: the reward cache's answer, without touching it (None: no reward cache);
    ``keep``: how far an item's states are worth keeping for later batches (None: prefix rows' states only)."""
    places: dict[tuple[int, ...], list[int]] = {}
    empty: list[int] = []
    for i, seq in enumerate(sequences):
        if len(seq):
            places.setdefault(sequence_key(seq), []).append(i)
        else:
            empty.append(i)
    computed: list[tuple[int, ...]] = []
    answered: list[tuple[tuple[int, ...], Reward, list[int]]] = []
    for seq, where in places.items():
        reward = cached_reward(seq) if cached_reward is not None else None
        if reward is None:
            computed.append(seq)
        else:
            answered.append((seq, reward, where))
    if known is None:
        levels = [[Row(seq, len(seq), 0, k) for k, seq in enumerate(computed)]] if computed else []
    else:
        levels = plan_levels(computed, known, overhead_tokens, keep=keep)
    return BatchPlan(
        size=len(sequences),
        received_tokens=sum(len(s) for s in sequences),
        computed=computed,
        places=[places[seq] for seq in computed],
        answered=answered,
        empty=empty,
        microbatches=[plan_level(level, max_batch_tokens, overhead_tokens) for level in levels],
        overhead_tokens=overhead_tokens,
    )
