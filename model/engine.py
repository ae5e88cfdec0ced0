"""``ScoringEngine``: batched forward passes that give every item the reward it would get alone.

Pipeline for one batch: sort by length → cut into micro-batches whose padded size
(rows × longest row) fits ``max_batch_tokens`` → pad, run the backbone under ``inference_mode`` →
gather each row's last real token **from the attention mask** → apply the reward head in fp32 on
those rows only → put results back in input order. A micro-batch that runs out of accelerator
memory is split in half and retried; an item that does not fit even alone gets a typed error and
the others are unaffected.

Example::

    engine = ScoringEngine(backbone, head, max_batch_tokens=16384)
    engine.score_batch([[1, 5, 9], [1, 7]])   # -> [0.31, -1.2]
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .errors import InternalError, ItemTooLargeForMemoryError, RMServeError

# A forward pass costs about this many padded tokens' worth of fixed overhead (kernel launches, Python);
# the planner trades a few extra micro-batches against padding with it.
MICROBATCH_OVERHEAD_TOKENS = 64


def plan_microbatches(
    sorted_lengths: Sequence[int], max_batch_tokens: int, overhead_tokens: int = MICROBATCH_OVERHEAD_TOKENS
) -> list[tuple[int, int]]:
    """Cut length-sorted (ascending) items into ``[start, end)`` runs whose padded size fits the budget.

    Minimises total padded tokens plus ``overhead_tokens`` per micro-batch, exactly, by dynamic
    programming over the cut points (contiguous runs of a sorted list are optimal for this cost). An
    item longer than the budget gets a micro-batch of its own.
    """
    n = len(sorted_lengths)
    best = [0.0] + [math.inf] * n  # best[j]: cost of planning the first j items
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = sorted_lengths[j - 1]
        max_rows = max(1, max_batch_tokens // max(longest, 1))
        for i in range(j - 1, max(j - max_rows, 0) - 1, -1):
            cost = best[i] + (j - i) * longest + overhead_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    plans: list[tuple[int, int]] = []
    j = n
    while j > 0:
        plans.append((cut[j], j))
        j = cut[j]
    return plans[::-1]


def padded_tokens(lengths: Sequence[int]) -> int:
    """Tokens a padded batch of these lengths computes: rows × longest row."""
    return len(lengths) * max(lengths, default=0)


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
    """Running totals; the server exports them as metrics."""

    batches: int = 0
    microbatches: int = 0
    items: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    oom_splits: int = 0
    forward_seconds: float = 0.0
    last_microbatch_sizes: list[int] = field(default_factory=list)

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0


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
    ):
        self.backbone = backbone
        self.head = head.float()
        self.max_batch_tokens = max_batch_tokens
        self.padding_side = padding_side
        self.pad_id = pad_id
        self.device = torch.device(device) if device is not None else _module_device(backbone)
        self.stats = EngineStats()
        # Test hook (off by default): called with (rows, max_len) before each forward; may raise OOM.
        self.fault_injector: Callable[[int, int], None] | None = None
        self.observers: list[MicrobatchObserver] = []
        self._lock = threading.Lock()

    def batch_cost(self, sequences: Sequence[Sequence[int]]) -> int:
        """Tokens (padding and per-forward overhead included) that ``score_batch(sequences)`` will compute.

        What a batching queue prices a batch with: pure Python, no forward.
        """
        lengths = sorted(len(s) for s in sequences)
        plan = plan_microbatches(lengths, self.max_batch_tokens)
        return sum(padded_tokens(lengths[s:e]) + MICROBATCH_OVERHEAD_TOKENS for s, e in plan)

    def score_batch(self, sequences: Sequence[Sequence[int]]) -> list[Outcome]:
        """Raw rewards in input order; an item that failed gets its ``RMServeError`` instead of a float."""
        if not sequences:
            return []
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        sorted_seqs = [sequences[i] for i in order]
        outcomes: list[Outcome] = [0.0] * len(sequences)
        with self._lock:
            self.stats.batches += 1
            self.stats.last_microbatch_sizes = []
            for start, end in plan_microbatches([len(s) for s in sorted_seqs], self.max_batch_tokens):
                results = self._run_splitting_on_oom(sorted_seqs[start:end])
                for k, value in enumerate(results):
                    outcomes[order[start + k]] = value
        return outcomes

    def score_microbatch(self, seqs: Sequence[Sequence[int]]) -> list[Outcome]:
        """Score these rows as one padded forward, as given (no sorting or planning; OOM still splits)."""
        with self._lock:
            return self._run_splitting_on_oom(list(seqs))

    def _run_splitting_on_oom(self, seqs: list[Sequence[int]]) -> list[Outcome]:
        try:
            rewards = self._forward(seqs)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            _free_accelerator_cache(self.device)
            if len(seqs) == 1:
                return [ItemTooLargeForMemoryError(f"an item of {len(seqs[0])} tokens does not fit in memory alone")]
            self.stats.oom_splits += 1
            half = len(seqs) // 2
            return self._run_splitting_on_oom(seqs[:half]) + self._run_splitting_on_oom(seqs[half:])
        return [
            r if math.isfinite(r) else InternalError(f"the model produced a non-finite reward ({r})") for r in rewards
        ]

    def _forward(self, seqs: list[Sequence[int]]) -> list[float]:
        lengths = [len(s) for s in seqs]
        rows, width = len(seqs), max(lengths)
        if self.fault_injector is not None:
            self.fault_injector(rows, width)
        input_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        for r, seq in enumerate(seqs):
            if self.padding_side == "right":
                input_ids[r, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
                mask[r, : len(seq)] = 1
            else:
                input_ids[r, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
                mask[r, width - len(seq) :] = 1
        # Positions count real tokens only, so a left-padded row sees the positions it would see alone.
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        started = time.perf_counter()
        with torch.inference_mode():
            input_ids, mask, position_ids = (t.to(self.device) for t in (input_ids, mask, position_ids))
            hidden = self.backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids)
            hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
            rows_idx = torch.arange(rows, device=hidden.device)
            last = hidden[rows_idx, last_token_index(mask).to(hidden.device)]
            rewards = self.head(last.float()).squeeze(-1).tolist()
        seconds = time.perf_counter() - started
        real = sum(lengths)
        self.stats.microbatches += 1
        self.stats.items += rows
        self.stats.real_tokens += real
        self.stats.padded_tokens += rows * width
        self.stats.forward_seconds += seconds
        self.stats.last_microbatch_sizes.append(rows)
        for observer in self.observers:
            observer(rows, rows * width, real, seconds)
        return rewards


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _free_accelerator_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
