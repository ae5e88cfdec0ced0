"""``ScoringEngine``: batched forward passes that give every item the reward it would get alone.

Pipeline for one batch:

1. exact duplicates are scored once, and a sequence scored recently is answered from the reward cache;
2. **prefix sharing** (``planning.plan_levels``): token-id prefixes shared by several items (a GRPO group's
   prompt, a system prompt) are computed once, as rows of an earlier level, and their keys and values kept in
   the prefix cache (``caches.PrefixKVCache``); each item then computes only what follows the longest prefix
   the cache holds, attending to the cached states. The cache outlives the batch (bounded by bytes, least
   recently used out), so group members that arrive in later batches reuse the prompt too;
3. each level is sorted by computed length and cut into micro-batches (``planning.plan_microbatches``) that
   minimise padded tokens plus a per-forward overhead **measured on this machine** (``calibrate``);
4. each micro-batch runs the backbone under ``inference_mode``; the hidden state of each item's last real
   token comes **from the attention mask**, the reward head runs in fp32 on those rows only, and results go
   back in input order. A micro-batch that runs out of accelerator memory is split in half and retried; an
   item that does not fit even alone gets a typed error and the others are unaffected.

Rewards do not depend on any of this (fp32: within 1e-5 of the item scored alone). ``prefix_sharing=False``
runs every item whole; ``prefix_cache_bytes=0`` keeps states only within a batch; ``reward_cache_items=0``
turns the reward cache off.

Example::

    engine = ScoringEngine(backbone, head, max_batch_tokens=16384, prefix_cache_bytes=2**30)
    engine.score_batch([[1, 5, 9], [1, 5, 7]])   # -> [0.31, -1.2]; [1, 5] computed once
"""

from __future__ import annotations

import inspect
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .caches import PrefixKVCache, RewardCache, token_digest
from .errors import InternalError, ItemTooLargeForMemoryError, RMServeError
from .planning import Row, levels_cost, padded_tokens, plan_level, plan_levels, plan_microbatches

# The per-forward overhead, in tokens, until ``calibrate`` measures it on the machine at hand.
DEFAULT_OVERHEAD_TOKENS = 64

__all__ = ["EngineStats", "ScoringEngine", "last_token_index", "padded_tokens", "plan_microbatches"]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, from the mask alone (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.to(torch.long) * positions).argmax(dim=1)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@dataclass
class EngineStats:
    """Running totals: the one store of what the engine did (a server reads its metrics from here, ``counters``)."""

    batches: int = 0
    microbatches: int = 0
    items: int = 0  # items asked for (duplicates and reward-cache hits included)
    real_tokens: int = 0  # tokens computed (shared prefixes once)
    padded_tokens: int = 0
    oom_splits: int = 0
    forward_seconds: float = 0.0
    received_tokens: int = 0  # tokens of every item asked for, duplicates included
    prefix_hits: int = 0  # item rows that started from cached keys/values
    prefix_misses: int = 0  # item rows computed from their first token
    reward_cache_hits: int = 0  # items answered without a forward (duplicate in the batch or cached reward)
    reward_cache_misses: int = 0
    last_microbatch_sizes: list[int] = field(default_factory=list)

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0

    @property
    def tokens_saved(self) -> int:
        """Tokens not computed thanks to prefix sharing and the reward cache."""
        return max(0, self.received_tokens - self.real_tokens)


Outcome = float | RMServeError
MicrobatchObserver = Callable[[int, int, int, float], None]  # rows, padded tokens, real tokens, seconds


class ScoringEngine:
    """Scores token-id sequences with a backbone and a ``Linear(hidden, 1)`` head (applied in fp32)."""

    def __init__(
        self,
        backbone: torch.nn.Module,
        head: torch.nn.Linear,
        *,
        max_batch_tokens: int = 16384,
        padding_side: str = "right",
        pad_id: int = 0,
        device: torch.device | str | None = None,
        prefix_sharing: bool = True,
        prefix_cache_bytes: int = 0,
        reward_cache_items: int = 0,
        overhead_tokens: float = DEFAULT_OVERHEAD_TOKENS,
    ):
        self.backbone = backbone
        self.head = head.float()
        self.max_batch_tokens = max_batch_tokens
        self.padding_side = padding_side
        self.pad_id = pad_id
        self.device = torch.device(device) if device is not None else _module_device(backbone)
        self.prefix_sharing = prefix_sharing
        self.prefix_cache = PrefixKVCache(prefix_cache_bytes)
        self.reward_cache = RewardCache(reward_cache_items)
        # Per-forward cost in tokens' worth of compute: the planner trades padding against forwards with it,
        # and a shared prefix must save at least this much to get a level of its own.
        self.overhead_tokens = overhead_tokens
        self.stats = EngineStats()
        # Test hook (off by default): called with (rows, longest row's length) before each forward; may raise OOM.
        self.fault_injector: Callable[[int, int], None] | None = None
        self.observers: list[MicrobatchObserver] = []
        self._lock = threading.Lock()
        # transformers >= 5.24 names the key/value cache argument `cache`; earlier versions `past_key_values`.
        params = inspect.signature(backbone.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    # -- public API ---------------------------------------------------------------------------------
    def batch_cost(self, sequences: Sequence[Sequence[int]]) -> int:
        """Tokens (padding and per-forward overhead included) that ``score_batch(sequences)`` would compute now.

        What a batching queue prices a batch with: prefix- and cache-aware, pure Python, no forward.
        """
        unique = {tuple(s): None for s in sequences if s}
        if self.reward_cache.max_items > 0:
            unique = {k: v for k, v in unique.items() if not self.reward_cache.contains(token_digest(k))}
        levels = self._plan(list(unique))
        return levels_cost(levels, self.max_batch_tokens, self.overhead_tokens)

    def score_batch(self, sequences: Sequence[Sequence[int]]) -> list[Outcome]:
        """Raw rewards in input order; an item that failed gets its ``RMServeError`` instead of a float."""
        if not sequences:
            return []
        outcomes: list[Outcome | None] = [None] * len(sequences)
        with self._lock:
            self.stats.batches += 1
            self.stats.last_microbatch_sizes = []
            self.stats.items += len(sequences)
            self.stats.received_tokens += sum(len(s) for s in sequences)
            wanted: dict[tuple[int, ...], list[int]] = {}
            for i, seq in enumerate(sequences):
                wanted.setdefault(tuple(seq), []).append(i)
            todo: list[tuple[int, ...]] = []
            for key, places in wanted.items():
                cached = self.reward_cache.get(token_digest(key)) if self.reward_cache.max_items > 0 else None
                self.stats.reward_cache_hits += len(places) - (cached is None)
                if cached is None:
                    todo.append(key)
                    continue
                for i in places:
                    outcomes[i] = cached
            self.stats.reward_cache_misses += len(todo)
            try:
                results = self._run_levels(self._plan(todo))
            finally:
                if self.prefix_cache.max_bytes > 0:
                    self.prefix_cache.evict_to_budget()
                else:
                    self.prefix_cache.clear()
            for k, key in enumerate(todo):
                outcome = results[k]
                if isinstance(outcome, float) and self.reward_cache.max_items > 0:
                    self.reward_cache.put(token_digest(key), outcome)
                for i in wanted[key]:
                    outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]

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
            "prefix_cache_bytes": self.prefix_cache.bytes,
            "reward_cache_hits": self.stats.reward_cache_hits,
            "reward_cache_misses": self.stats.reward_cache_misses,
            "reward_cache_items": len(self.reward_cache),
        }

    def configure_sharing(self, *, prefix_sharing: bool, prefix_cache_bytes: int, reward_cache_items: int) -> None:
        """Switch prefix sharing and resize both caches (emptied: what they held may no longer fit)."""
        with self._lock:
            self.prefix_sharing = prefix_sharing
            self.prefix_cache = PrefixKVCache(prefix_cache_bytes)
            self.reward_cache = RewardCache(reward_cache_items)

    def score_microbatch(self, seqs: Sequence[Sequence[int]]) -> list[Outcome]:
        """Score these rows whole as one padded forward, as given (no sharing, caches or planning; OOM still
        splits). For measurements of what a plain padded batch costs."""
        rows = [Row(seq, len(seq), 0, k) for k, seq in enumerate(seqs)]
        with self._lock:
            outcomes = self._run_splitting_on_oom(rows, store=False)
        return [outcomes[k] for k in range(len(rows))]

    def calibrate(self, max_tokens: int = 2048, repeats: int = 5) -> float:
        """Measure the per-forward overhead in tokens on this machine and use it from now on; returns it.

        Times a 16-token and a long forward of one row (the fastest of ``repeats`` each: noise only slows a run
        down) and extrapolates the short one's time to zero tokens.
        """
        long = max(32, min(max_tokens, self.max_batch_tokens, _max_positions(self.backbone)))
        seconds = {}
        with self._lock:
            for n in (16, long):
                row = [Row([self.pad_id] * n, n, 0, 0)]
                run = lambda row=row: self._forward(row, store=False, observe=False)  # noqa: E731
                seconds[n] = min(_timed(run) for _ in range(repeats))
        per_token = max((seconds[long] - seconds[16]) / (long - 16), 1e-12)
        overhead = max(0.0, seconds[16] - 16 * per_token) / per_token
        self.overhead_tokens = float(min(overhead, self.max_batch_tokens))
        return self.overhead_tokens

    # -- planning and running -----------------------------------------------------------------------
    def _plan(self, seqs: list[tuple[int, ...]]) -> list[list[Row]]:
        if not self.prefix_sharing:
            return [[Row(seq, len(seq), 0, k) for k, seq in enumerate(seqs)]] if seqs else []
        return plan_levels(seqs, self.prefix_cache.known, self.overhead_tokens)

    def _run_levels(self, levels: list[list[Row]]) -> dict[int, Outcome]:
        results: dict[int, Outcome] = {}
        store_items = self.prefix_sharing and self.prefix_cache.max_bytes > 0
        for level in levels:
            for row in level:  # what the cache holds now, including what the previous level left
                limit = row.end - 1 if row.item is not None else row.end
                row.start, row.past = self.prefix_cache.match(row.seq, limit) if self.prefix_sharing else (0, [])
                if row.item is not None:
                    if row.start:
                        self.stats.prefix_hits += 1
                    else:
                        self.stats.prefix_misses += 1
            for chunk in plan_level(level, self.max_batch_tokens, self.overhead_tokens):
                store = store_items or any(r.item is None for r in chunk)
                results.update(self._run_splitting_on_oom(chunk, store))
        return results

    def _run_splitting_on_oom(self, rows: list[Row], store: bool) -> dict[int, Outcome]:
        try:
            rewards = self._forward(rows, store)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            _free_accelerator_cache(self.device)
            if len(rows) == 1:
                row = rows[0]
                error = ItemTooLargeForMemoryError(f"an item of {row.end} tokens does not fit in memory alone")
                return {row.item: error} if row.item is not None else {}
            self.stats.oom_splits += 1
            half = len(rows) // 2
            return {**self._run_splitting_on_oom(rows[:half], store), **self._run_splitting_on_oom(rows[half:], store)}
        return {
            item: r if math.isfinite(r) else InternalError(f"the model produced a non-finite reward ({r})")
            for item, r in rewards.items()
        }

    def _forward(self, rows: list[Row], store: bool, observe: bool = True) -> dict[int, float]:
        """One padded forward of ``rows`` on top of their cached states; stores new states when ``store``."""
        count, cached_width = len(rows), max(r.start for r in rows)
        width = max(r.new_tokens for r in rows)
        if self.fault_injector is not None:
            self.fault_injector(count, max(r.end for r in rows))
        input_ids = torch.full((count, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((count, cached_width + width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids = torch.as_tensor(row.seq[row.start : row.end], dtype=torch.long)
            first = 0 if self.padding_side == "right" else width - len(ids)
            input_ids[r, first : first + len(ids)] = ids
            mask[r, : row.start] = 1
            mask[r, cached_width + first : cached_width + first + len(ids)] = 1
        new_mask = mask[:, cached_width:]
        # Positions count real tokens only, so every row sees the positions it would see alone.
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, cached_width:]
        started = time.perf_counter()
        with torch.inference_mode():
            input_ids, mask, position_ids = (t.to(self.device) for t in (input_ids, mask, position_ids))
            cache = _stack_past(rows, cached_width, self.device) if cached_width else _empty_cache() if store else None
            kwargs = {self._cache_kwarg: cache} if cache is not None else {}
            out = self.backbone(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=cache is not None,
                **kwargs,
            )
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            scored = [r for r, row in enumerate(rows) if row.item is not None]
            last = hidden[torch.arange(count, device=hidden.device), last_token_index(new_mask).to(hidden.device)]
            rewards: list[float] = []
            if scored:
                rewards = self.head(last[torch.tensor(scored, device=hidden.device)].float()).squeeze(-1).tolist()
            if store:
                # A NaN or inf anywhere in a row's keys or values reaches its last token (even a masked-out NaN
                # does: 0 x NaN is NaN), so a finite last hidden state vouches for the whole row.
                self._store(rows, torch.isfinite(last).all(dim=1).tolist(), cache, cached_width)
        seconds = time.perf_counter() - started
        if observe:
            real = sum(r.new_tokens for r in rows)
            self.stats.microbatches += 1
            self.stats.real_tokens += real
            self.stats.padded_tokens += count * width
            self.stats.forward_seconds += seconds
            self.stats.last_microbatch_sizes.append(count)
            for observer in self.observers:
                observer(count, count * width, real, seconds)
        return {rows[r].item: reward for r, reward in zip(scored, rewards, strict=True)}

    def _store(self, rows: list[Row], finite: list[bool], cache, cached_width: int) -> None:
        """Put the new keys and values of each row whose states are ``finite`` into the prefix cache (one poisoned
        token would otherwise corrupt every item that later shares the row's prefix)."""
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        # [layers, 2, rows, kv_heads, new tokens, head_dim]
        new = torch.stack([torch.stack((k[:, :, cached_width:], v[:, :, cached_width:])) for k, v in layers])
        width = new.shape[4]
        for r, (row, ok) in enumerate(zip(rows, finite, strict=True)):
            if not ok:
                continue
            first = 0 if self.padding_side == "right" else width - row.new_tokens
            self.prefix_cache.insert(row.seq, row.start, new[:, :, r, :, first : first + row.new_tokens])


def _empty_cache():
    from transformers import DynamicCache

    return DynamicCache()


def _stack_past(rows: list[Row], cached_width: int, device: torch.device):
    """A ``DynamicCache`` holding each row's cached states, left-aligned, padded to ``cached_width``."""
    from transformers import DynamicCache

    sample = next(seg for row in rows for seg in row.past)
    layers, _, heads, _, dim = sample.shape
    buffer = torch.zeros((layers, 2, len(rows), heads, cached_width, dim), dtype=sample.dtype, device=device)
    for r, row in enumerate(rows):
        pos = 0
        for seg in row.past:
            buffer[:, :, r, :, pos : pos + seg.shape[3]] = seg
            pos += seg.shape[3]
    return DynamicCache(ddp_cache_data=[(buffer[layer, 0], buffer[layer, 1]) for layer in range(layers)])


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _max_positions(backbone: torch.nn.Module) -> int:
    return int(getattr(getattr(backbone, "config", None), "max_position_embeddings", None) or 2048)


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _free_accelerator_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
