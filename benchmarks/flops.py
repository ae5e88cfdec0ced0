"""FLOP and padding arithmetic of a LLaMA-style decoder: the numbers MFU and padding efficiency are made of.

Convention (the one PaLM's MFU and most serving papers use, with full attention):

* **Weight matmuls**: ``2 × N`` FLOPs per token, ``N`` = non-embedding parameters (q, k, v, o, gate, up,
  down and the norms; the embedding table is a lookup, and the ``Linear(hidden, 1)`` reward head runs on one
  token per item, so both are left out).
* **Attention**: in each layer, ``QKᵀ`` and ``A·V`` each cost ``2 · seq · d_head · n_heads`` FLOPs per token
  for *full* attention over the row (no credit for the causal mask's skipped half), i.e.
  ``4 · L · seq · n_heads · d_head`` per token (``= 4·L·seq·hidden`` for LLaMA, where ``n_heads·d_head = hidden``).
* **Model FLOPs** (for MFU) count **real tokens only**, each attending over its own item's length ``s``:
  an item costs ``s · 2N + 4 · L · d_attn · s²``. **Padded FLOPs** (what the device actually computed)
  count every padded position of a micro-batch of ``rows × width``: ``rows · (width · 2N + 4 · L · d_attn · width²)``.
* **MFU** = model FLOPs ÷ wall seconds ÷ the peak matmul FLOP/s measured on the same device, same dtype, same run.

Example::

    shape = DecoderShape(hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=8, head_dim=64,
                         intermediate_size=1376, vocab_size=32000)
    shape.non_embedding_params()          # 18,979,328
    model_flops(shape, [512, 1024])       # FLOPs of scoring these two items
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderShape:
    """The dimensions of a LLaMA-style decoder that its FLOP count depends on."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, config) -> DecoderShape:
        """From a ``transformers`` config (``LlamaConfig`` and relatives)."""
        heads = config.num_attention_heads
        return cls(
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
        )

    @property
    def attention_width(self) -> int:
        """``n_heads · d_head``: the width of Q (and of the attention output)."""
        return self.num_heads * self.head_dim

    def layer_params(self) -> int:
        """Weights of one decoder layer (bias-free LLaMA): q, k, v, o, gate, up, down, two RMSNorms."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = h * self.attention_width + 2 * h * kv + self.attention_width * h
        mlp = 3 * h * self.intermediate_size
        return attention + mlp + 2 * h

    def non_embedding_params(self) -> int:
        """``N``: all layers plus the final norm (no embedding table, no LM head, no reward head)."""
        return self.num_layers * self.layer_params() + self.hidden_size


def flops_per_token(shape: DecoderShape, seq_len: int) -> int:
    """FLOPs of one token in a row of ``seq_len``: ``2·N + 4·L·seq·n_heads·d_head`` (full attention)."""
    return 2 * shape.non_embedding_params() + 4 * shape.num_layers * seq_len * shape.attention_width


def model_flops(shape: DecoderShape, lengths: Iterable[int]) -> int:
    """Useful FLOPs of scoring items of these real lengths (each token attends over its own item)."""
    return sum(s * flops_per_token(shape, s) for s in lengths)


def padded_flops(shape: DecoderShape, rows: int, width: int) -> int:
    """FLOPs a padded micro-batch of ``rows × width`` computes, padding included."""
    return rows * width * flops_per_token(shape, width)


def padding_efficiency(groups: Sequence[Sequence[int]]) -> float:
    """Real tokens ÷ padded tokens when each group of lengths runs as one padded forward (rows × longest)."""
    real = sum(sum(g) for g in groups)
    padded = sum(len(g) * max(g) for g in groups if g)
    return real / padded if padded else 1.0


def matmul_flops(m: int, k: int, n: int) -> int:
    """FLOPs of ``(m × k) @ (k × n)``: one multiply and one add per term."""
    return 2 * m * k * n


def utilization(flops: float, seconds: float, peak_flops_per_s: float) -> float:
    """Achieved FLOP/s as a fraction of the peak (MFU when ``flops`` are model FLOPs)."""
    if seconds <= 0 or peak_flops_per_s <= 0:
        return 0.0
    return flops / seconds / peak_flops_per_s
