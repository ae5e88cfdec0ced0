"""``ScoringEngine``: batched forward passes that give every item the reward it would get alone.

The engine owns the pieces and ties them: ``planning`` decides what a batch does, ``runner`` runs one micro-batch,
``caches`` keeps prefix states and rewards between batches; the engine holds the lock, the stats and the observers.

1. ``plan(seqs)`` (``planning.plan_batch``, pure Python, no forward): exact duplicates are scored once and a
   sequence scored recently is answered from the reward cache; token-id prefixes shared by several items (a GRPO
   group's prompt, a system prompt) become rows of an earlier level, computed once and kept in the prefix cache;
   each item starts after the longest prefix the cache holds or an earlier level leaves there; each level is cut
   into micro-batches that minimise padded tokens plus a per-forward overhead **measured on this machine**
   (``calibrate``). The plan's ``cost`` is what a batching queue prices the batch at (``batch_cost``).
2. ``run(plan)`` executes exactly that plan, one ``ForwardRunner.run`` per micro-batch, and updates the caches. A
   micro-batch that runs out of memory is split in half and retried (the one deviation from the plan, counted in
   ``stats.oom_splits``); a row that fails (out of memory alone, non-finite states) fails the items that share it.

**Step rewards.** A ``StepIds`` sequence (a process reward model's item: the ids, and the positions of its step
separators) is read at each separator instead of at its last token: its outcome is one reward per separator. The
planner lets a row start from cached states only up to its first separator, so a GRPO group's shared prompt is
computed once while each sample computes its own steps; the reward cache keys it by ids and separator positions.

The prefix cache outlives the batch (bounded by bytes, least recently used out), so group members that arrive in
later batches reuse the prompt too. A group's first sample keeps nothing (nothing shared its tokens yet), but its
forward's keys and values stay held by reference for a few batches (``caches.RecentForwards``, a quarter of the
prefix budget): when the second sample arrives, the plan counts the prompt as known and ``run`` first copies it
out of the held forward into the prefix cache ("promotes" it), so no sample computes the prompt twice and items
that share nothing copy nothing. Rewards do not depend on any of this (fp32: within 1e-5 of the item scored
alone). ``prefix_sharing=False`` runs every item whole; ``prefix_cache_bytes=0`` keeps states only within a batch;
``reward_cache_items=0`` turns the reward cache off.

Example::

    engine = ScoringEngine(backbone, head, max_batch_tokens=16384, prefix_cache_bytes=2**30)
    prompt = list(range(3, 403))                             # 400 tokens (a stretch under 16 is not shared)
    engine.score_batch([prompt + [9], prompt + [7]])        # -> [0.31, -1.2]; the prompt computed once
    plan = engine.plan([prompt + [9], prompt + [7]])        # the same, in two steps: plan.cost is its price
    engine.run(plan)
    engine.score_batch([StepIds([1, 5, 2, 9, 2], readouts=(2, 4))])   # -> [[0.8, 0.3]]: one reward per separator
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from .caches import HeldRow, PrefixKVCache, RecentForwards, RewardCache, SeenPrefixes, token_digest
from .errors import InvalidRequestError, RMServeError
from .planning import BatchPlan, Row, padded_tokens, plan_batch, plan_microbatches
from .runner import ForwardRunner, last_token_index
from .stats import EngineStats, StatsMeter

# The per-forward overhead, in tokens, until ``calibrate`` measures it on the machine at hand.
DEFAULT_OVERHEAD_TOKENS = 64
# The share of the prefix cache's byte budget that the last forwards' keys and values may take while held: a GRPO
# step's first samples are held whole (prompt and response) until their groups' second samples show where the prompt
# ends, and the prompts then stored take about as much again.
HELD_SHARE = 0.5
# After this many items in a row that shared nothing (PPO traffic), forwards are no longer held for later batches:
# keeping every layer's keys and values through a forward costs a CPU ~5 % (bench-20M bf16, 37-item PPO batches:
# 68.5 vs 72.0 items/s). ``SeenPrefixes`` still records every item, so a group's next sample shows sharing again.
# A GRPO step whose groups are many sends that many first samples before any second one: when sharing shows after
# a longer run, the limit becomes twice that run (the next step's first samples are held), up to MAX_IDLE_ITEMS.
IDLE_ITEMS = 64
MAX_IDLE_ITEMS = 8192

__all__ = ["BatchPlan", "EngineStats", "ScoringEngine", "last_token_index", "padded_tokens", "plan_microbatches"]


Outcome = float | list[float] | RMServeError  # a list: one reward per readout of a ``StepIds`` sequence
MicrobatchObserver = Callable[[int, int, int, float], None]  # rows, padded tokens, real tokens, seconds


class ScoringEngine:
    """Scores token-id sequences with a backbone and a head (``Linear(hidden, 1)`` or a ``heads.ScoreHead``, applied
    in fp32): one reward per sequence at its last token, or one per readout of a ``StepIds`` (step rewards)."""

    def __init__(
        self,
        backbone: torch.nn.Module,
        head: torch.nn.Module,
        *,
        max_batch_tokens: int = 16384,
        padding_side: str = "right",
        pad_id: int = 0,
        device: torch.device | str | None = None,
        prefix_sharing: bool = True,
        prefix_cache_bytes: int = 0,
        reward_cache_items: int = 0,
        overhead_tokens: float = DEFAULT_OVERHEAD_TOKENS,
        batch_invariant: bool = False,
        compile: str = "auto",
    ):
        self.runner = ForwardRunner(
            backbone,
            head,
            padding_side=padding_side,
            pad_id=pad_id,
            device=device,
            batch_invariant=batch_invariant,
            compile=compile,
        )
        self.max_batch_tokens = max_batch_tokens
        self.prefix_sharing = prefix_sharing
        self.prefix_cache = PrefixKVCache(prefix_cache_bytes)
        self.recent = RecentForwards(int(prefix_cache_bytes * HELD_SHARE))
        self.reward_cache = RewardCache(reward_cache_items)
        self.seen = SeenPrefixes()  # which prefixes earlier items had: what an item's states are kept for
        self._unshared = 0  # items computed in a row that shared nothing (``_holds``)
        self.idle_items = IDLE_ITEMS  # how many of those stop the holding; learnt from the traffic (``_holds``)
        # Per-forward cost in tokens' worth of compute: the planner trades padding against forwards with it,
        # and a shared prefix must save at least this much to get a level of its own.
        self.overhead_tokens = overhead_tokens
        self.stats = EngineStats()
        self.observers: list[MicrobatchObserver] = []
        self._lock = threading.Lock()
        self._generation = 0  # changes whenever the caches may have: a plan made before is stale
        self._meter = StatsMeter(self)

    # -- plan and run -------------------------------------------------------------------------------
    def plan(self, sequences: Sequence[Sequence[int]]) -> BatchPlan:
        """What ``run`` will do for ``sequences`` now, and what it costs. Pure Python, no forward, no state change.

        Valid only until the engine next runs a batch or changes its caches; ``run`` refuses it after that.
        """
        with self._lock:
            return self._plan(sequences)

    def run(self, plan: BatchPlan) -> list[Outcome]:
        """Execute ``plan``: raw rewards in input order, an ``RMServeError`` in place of an item that failed."""
        with self._lock:
            return self._run(plan)

    def score_batch(self, sequences: Sequence[Sequence[int]]) -> list[Outcome]:
        """``run(plan(sequences))`` under one hold of the lock (so the plan cannot go stale in between)."""
        with self._lock:
            return self._run(self._plan(sequences))

    def batch_cost(self, sequences: Sequence[Sequence[int]]) -> int:
        """``plan(sequences).cost``: tokens (padding and per-forward overhead included) ``score_batch`` would
        compute now. What a batching queue prices a batch with."""
        return self.plan(sequences).cost

    # -- numbers and settings -----------------------------------------------------------------------
    def counters(self) -> dict[str, float]:
        """The engine's totals as the server's metrics name them: read from ``stats`` and the caches, never kept
        twice."""
        return {
            "forward_real_tokens": self.stats.real_tokens,
            "forward_padded_tokens": self.stats.padded_tokens,
            "oom_splits": self.stats.oom_splits,
            **self.cache_counters(),
        }

    def cache_counters(self) -> dict[str, float]:
        """Prefix sharing and cache totals, named as the server's metrics name them."""
        return {
            "prefix_cache_hits": self.stats.prefix_hits,
            "prefix_cache_misses": self.stats.prefix_misses,
            "prefix_tokens_saved": self.stats.tokens_saved,
            "prefix_cache_bytes": self.prefix_cache.bytes + self.recent.bytes,
            "reward_cache_hits": self.stats.reward_cache_hits,
            "reward_cache_misses": self.stats.reward_cache_misses,
            "reward_cache_items": len(self.reward_cache),
        }

    def configure_sharing(self, *, prefix_sharing: bool, prefix_cache_bytes: int, reward_cache_items: int) -> None:
        """Switch prefix sharing and resize both caches (emptied: what they held may no longer fit)."""
        with self._lock:
            self.prefix_sharing = prefix_sharing
            self.prefix_cache = PrefixKVCache(prefix_cache_bytes)
            self.recent.clear()
            self.recent = RecentForwards(int(prefix_cache_bytes * HELD_SHARE))
            self.reward_cache = RewardCache(reward_cache_items)
            self.seen.clear()
            self._unshared = 0
            self.idle_items = IDLE_ITEMS
            self._generation += 1

    def drop_caches(self) -> None:
        """Empty the prefix and reward caches, keeping their sizes (sleep: their memory goes back; a plan made before
        is stale)."""
        with self._lock:
            self.prefix_cache.clear()
            self.recent.clear()
            self.reward_cache.clear()
            self.seen.clear()
            self._unshared = 0
            self._generation += 1

    def use_weights(self, backbone: torch.nn.Module, head: torch.nn.Linear) -> None:
        """Score with these modules from now on (a wake from sleep level 2 reloads them from the checkpoint)."""
        with self._lock:
            self.runner.backbone = backbone
            self.runner.head = head.float()

    def calibrate(self, max_tokens: int = 2048, repeats: int = 5) -> float:
        """Measure the per-forward overhead in tokens on this machine and use it from now on; returns it.

        Times a 16-token and a long forward of one row (the fastest of ``repeats`` each: noise only slows a run
        down) and extrapolates the short one's time to zero tokens.
        """
        long = max(32, min(max_tokens, self.max_batch_tokens, self.runner.max_positions()))
        with self._lock:
            seconds = {n: min(self.runner.time_forward(n) for _ in range(repeats)) for n in (16, long)}
        per_token = max((seconds[long] - seconds[16]) / (long - 16), 1e-12)
        overhead = max(0.0, seconds[16] - 16 * per_token) / per_token
        self.overhead_tokens = float(min(overhead, self.max_batch_tokens))
        return self.overhead_tokens

    def score_microbatch(self, seqs: Sequence[Sequence[int]]) -> list[Outcome]:
        """Score these rows whole as one padded forward, as given (no sharing, caches or planning; OOM still
        splits). For measurements of what a plain padded batch costs."""
        rows = [Row(seq, len(seq), 0, k) for k, seq in enumerate(seqs)]
        with self._lock:
            outcomes = self.runner.run(rows, None, self._meter)
        return [outcomes[row] for row in rows]  # type: ignore[misc]

    # -- what the runner holds, under the engine's names --------------------------------------------
    @property
    def backbone(self) -> torch.nn.Module:
        return self.runner.backbone

    @property
    def head(self) -> torch.nn.Module:
        return self.runner.head

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def batch_invariant(self) -> bool:
        """Whether an item's reward is the same bits in any batch (``invariant.py``)."""
        return self.runner.batch_invariant

    @property
    def padding_side(self) -> str:
        return self.runner.padding_side

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        self.runner.padding_side = side

    @property
    def fault_injector(self) -> Callable[[int, int], None] | None:
        """Test hook: called with (rows, longest row's length) before each forward; may raise OOM."""
        return self.runner.fault_injector

    @fault_injector.setter
    def fault_injector(self, hook: Callable[[int, int], None] | None) -> None:
        self.runner.fault_injector = hook

    # -- internals (the lock held) ------------------------------------------------------------------
    def _plan(self, sequences: Sequence[Sequence[int]]) -> BatchPlan:
        rewards = self.reward_cache
        plan = plan_batch(
            sequences,
            known=(self._known if self._keeps_states() else self.prefix_cache.known) if self.prefix_sharing else None,
            cached_reward=(lambda seq: rewards.peek(token_digest(seq))) if rewards.max_items > 0 else None,
            keep=self.seen.shared if self._keeps_states() else None,
            max_batch_tokens=self.max_batch_tokens,
            overhead_tokens=self.overhead_tokens,
        )
        plan.generation = self._generation
        return plan

    def _keeps_states(self) -> bool:
        return self.prefix_sharing and self.prefix_cache.max_bytes > 0

    def _known(self, seq: Sequence[int], limit: int) -> int:
        """Leading tokens of ``seq`` whose states the prefix cache holds, or a held forward it can be given from."""
        return max(self.prefix_cache.known(seq, limit), self.seen.held(seq, limit)[0])

    def _promote(self, plan: BatchPlan) -> None:
        """Copy into the prefix cache what the plan's rows start from but only a held forward has (``_known``)."""
        for row in (r for level in plan.microbatches for chunk in level for r in chunk):
            if row.parent is not None or row.start == 0:
                continue
            cached = self.prefix_cache.known(row.seq, row.start)
            if cached >= row.start:
                continue
            length, where = self.seen.held(row.seq, row.start)
            if where is None or length < row.start:  # the plan read state that has changed since: a bug
                raise RuntimeError(f"no held forward has the {row.start} tokens a planned row starts from")
            self.prefix_cache.insert(row.seq, cached, where.states(cached, row.start))

    def _run(self, plan: BatchPlan) -> list[Outcome]:
        if plan.generation != self._generation:
            raise ValueError("a stale plan: the engine ran or changed its caches after it was made; plan again")
        if not plan.size:
            return []
        outcomes: list[Outcome | None] = [None] * plan.size
        for i in plan.empty:
            outcomes[i] = InvalidRequestError("an empty token sequence has no reward")
        for seq, reward, places in plan.answered:
            self.reward_cache.get(token_digest(seq))  # recently used
            for i in places:
                outcomes[i] = reward
        self._count(plan)
        held: dict[Row, HeldRow] = {}
        try:
            if self._keeps_states():
                self._promote(plan)
            results = self._run_microbatches(plan, held, self.recent if self._holds(plan) else None)
        finally:
            self._generation += 1
            if self.prefix_cache.max_bytes > 0:
                self.prefix_cache.evict_to_budget(reserved=self.recent.bytes)
            else:
                self.prefix_cache.clear()
        if self._keeps_states():
            where = {row.item: held.get(row) for row in plan.items}
            for k, seq in enumerate(plan.computed):
                self.seen.add(seq, where.get(k))
        for k, seq in enumerate(plan.computed):
            outcome = results[k]
            if isinstance(outcome, float | list) and self.reward_cache.max_items > 0:
                self.reward_cache.put(token_digest(seq), outcome)
            for i in plan.places[k]:
                outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]

    def _holds(self, plan: BatchPlan) -> bool:
        """Whether this batch's forwards are held for later batches: states are kept, and the batch shares something
        (a prefix row, a row on cached states, an item sharing with an earlier one) or fewer than ``idle_items`` items
        in a row have shared nothing (then what is held is let go). Call once per batch run."""
        if not self._keeps_states():
            return False
        rows = (r for level in plan.microbatches for chunk in level for r in chunk)
        if any(r.item is None or r.start > 0 or r.store for r in rows):
            if self.idle_items <= self._unshared <= MAX_IDLE_ITEMS // 2:  # a wave of first samples outran the limit
                self.idle_items = 2 * self._unshared
            self._unshared = 0
        else:
            self._unshared += len(plan.computed)
        if self._unshared < self.idle_items:
            return True
        self.recent.clear()  # what is still held from before is not read either: its memory goes back
        return False

    def _run_microbatches(
        self, plan: BatchPlan, held: dict[Row, HeldRow], recent: RecentForwards | None
    ) -> dict[int, Outcome]:
        """Each micro-batch as planned, level by level; a row whose shared prefix failed gets the prefix's error.
        ``recent``: where forwards are held (None: not held); ``held``: where each item row's states lie then."""
        results: dict[int, Outcome] = {}
        failed: dict[Row, RMServeError] = {}  # prefix rows whose states are not in the cache
        for level in plan.microbatches:
            for chunk in level:
                rows = []
                for row in chunk:
                    error = failed.get(row.parent) if row.parent is not None else None
                    if error is None:
                        rows.append(row)
                    elif row.item is None:
                        failed[row] = error
                    else:
                        results[row.item] = error
                if not rows:
                    continue
                for row, outcome in self.runner.run(rows, self.prefix_cache, self._meter, recent, held).items():
                    if row.item is not None:
                        results[row.item] = outcome  # type: ignore[assignment]
                    elif outcome is not None:
                        failed[row] = outcome  # type: ignore[assignment]
        return results

    def _count(self, plan: BatchPlan) -> None:
        stats = self.stats
        stats.batches += 1
        stats.last_microbatch_sizes = []
        stats.items += plan.size
        stats.received_tokens += plan.received_tokens
        stats.reward_cache_hits += plan.reward_cache_hits
        stats.reward_cache_misses += len(plan.computed)
        stats.prefix_hits += plan.prefix_hits
        stats.prefix_misses += len(plan.computed) - plan.prefix_hits
