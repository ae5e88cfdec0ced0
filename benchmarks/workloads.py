"""Seeded synthetic workloads shaped like RLHF traffic (no downloads).

Example::

    lengths = ppo_lengths(1000, seed=0)          # lognormal, median ≈ 300, within [16, 2048]
"""

from __future__ import annotations

import math
import random


def lognormal_lengths(n: int, *, median: float, sigma: float, low: int, high: int, seed: int) -> list[int]:
    """``n`` integer lengths, lognormal around ``median``, clipped to ``[low, high]``."""
    rng = random.Random(seed)
    return [min(high, max(low, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def ppo_lengths(n: int, seed: int = 0, *, median: int = 300, low: int = 16, high: int = 2048) -> list[int]:
    """Total (prompt + response) lengths of a PPO rollout: lognormal, median ≈ 300, 16 to 2048 tokens."""
    return lognormal_lengths(n, median=median, sigma=0.8, low=low, high=high, seed=seed)


def random_token_ids(lengths: list[int], vocab_size: int, seed: int = 0, bos_id: int | None = None) -> list[list[int]]:
    """Random token sequences of the given lengths (ids in ``[2, vocab_size)``, optional leading BOS)."""
    rng = random.Random(seed)
    seqs = []
    for n in lengths:
        seq = [rng.randrange(2, vocab_size) for _ in range(n)]
        if bos_id is not None:
            seq[0] = bos_id
        seqs.append(seq)
    return seqs
