"""What the scoring engine did: ``EngineStats`` (running totals) and ``StatsMeter`` (how forwards get counted).

A server reads its metrics from these totals (``ScoringEngine.counters``) and may swap in a fresh ``EngineStats`` to
count from a point on; the meter always writes to the engine's current one.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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


class StatsMeter:
    """What the runner computed, into the engine's stats and observers (called with the engine's lock held)."""

    def __init__(self, engine):
        # The engine (its ``stats`` and ``observers``), not the stats themselves: a server swaps in fresh ones.
        self._engine = engine

    def forward(self, rows: int, padded_tokens: int, real_tokens: int, seconds: float) -> None:
        stats = self._engine.stats
        stats.microbatches += 1
        stats.real_tokens += real_tokens
        stats.padded_tokens += padded_tokens
        stats.forward_seconds += seconds
        stats.last_microbatch_sizes.append(rows)
        for observer in self._engine.observers:
            observer(rows, padded_tokens, real_tokens, seconds)

    def oom_split(self) -> None:
        self._engine.stats.oom_splits += 1
