"""Batch-invariant scoring: every reduction in a fixed order, so an item's reward is the same bits in any batch.

What varies on a CPU with plain torch (measured by ``benchmarks/batch_invariance.py``), and what replaces it here:

* **Linear layers.** A row of ``x @ W.T`` depends on how many rows the call has: MKL (fp32) and oneDNN (bf16) pick
  other kernels and K-blockings for other row counts. ``FixedRowsLinear`` runs every matmul as calls of exactly
  ``MATMUL_ROWS`` rows (the last call overlaps the previous one; fewer rows are zero-padded), so a token's output
  never depends on how many tokens share the forward.
* **Attention.** SDPA's reduction over keys depends on where padding puts a sequence's keys and on how many there
  are; a cached prompt changes the query and key layout again. ``block_attention`` places keys and queries at their
  **position in the sequence** (not their column in the batch), cuts them into ``BLOCK``-token blocks counted from
  the sequence's first token, and reduces over key blocks in order with an online softmax (fp32). A block of keys a
  query cannot see changes nothing bit for bit (its weights are exact zeros, its rescale factor exactly 1), so the
  batch's longest row, the padding side and amount, and whether the prompt came from the prefix cache give the
  same sums. Its matmuls have one fixed shape per model, ``[group x BLOCK, head_dim] @ [head_dim, BLOCK]`` and
  ``[group x BLOCK, BLOCK] @ [BLOCK, head_dim + 1]`` (a column of ones sums the weights), batched over blocks: a
  product's bits were measured not to depend on how many share the batched call.
* **The reward head.** ``Linear(hidden, 1)`` over the scored rows is a matrix-vector product whose kernel depends
  on the row count; ``head_rewards`` multiplies and sums the hidden size in a fixed pairwise order.
* **Activations.** torch computes SiLU (and GELU, sigmoid) with SIMD code for whole vectors and with scalar code for
  the tail of each thread's range; the two differ in the last bit, and where the tail falls depends on how many
  tokens the tensor holds. ``FixedChunkActivation`` applies them in calls of a fixed element count that every thread
  splits into whole vectors (``fixed_elementwise``), so every element takes the SIMD path.

Measured invariant, and kept: RMSNorm (its mean over the hidden size, an exact rsqrt), exp, sin and cos (rotary
embeddings, the softmax), multiplications and adds. Positions count real tokens only (the runner's
``position_ids``), so padding never moves them.

Example::

    make_batch_invariant(backbone)            # swaps linears, activations and attention in place
    layout = BlockLayout.build(starts, ends, cached_width=0, width=12, padding_side="right")
    backbone(input_ids=ids, position_ids=pos, rmserve_blocks=layout)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION_NAME = "rmserve_batch_invariant"
BLOCK = 64  # tokens per query and key block, counted from each sequence's first token
MATMUL_ROWS = 512  # rows of every linear-layer matmul call (fewer calls: each starts the thread pool)
GRAIN = 32768  # torch's parallel grain (elements): a call this size runs on one thread
VECTOR = 64  # elements a SIMD loop takes per step, for every dtype and vector width torch dispatches to


class FixedRowsLinear(torch.nn.Linear):
    """``nn.Linear`` whose matmul always runs on ``MATMUL_ROWS`` rows at a time (same parameters, same result
    for a row whatever the other rows)."""

    @classmethod
    def wrap(cls, linear: torch.nn.Linear) -> FixedRowsLinear:
        fixed = cls.__new__(cls)
        torch.nn.Module.__init__(fixed)
        fixed.in_features, fixed.out_features = linear.in_features, linear.out_features
        fixed.weight, fixed.bias = linear.weight, linear.bias  # the same Parameters, not copies
        return fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fixed_rows_linear(x, self.weight, self.bias)


def fixed_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed ``MATMUL_ROWS`` rows per call."""
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    if rows < MATMUL_ROWS:
        padded = flat.new_zeros((MATMUL_ROWS, flat.shape[1]))
        padded[:rows] = flat
        return fixed_rows_linear(padded, weight, bias)[:rows].reshape(*x.shape[:-1], -1)
    flat = flat.contiguous()
    out = flat.new_empty((rows, weight.shape[0]))
    for first in range(0, rows, MATMUL_ROWS):
        first = min(first, rows - MATMUL_ROWS)  # the last call overlaps the one before: same rows, same results
        chunk, into = flat[first : first + MATMUL_ROWS], out[first : first + MATMUL_ROWS]
        if bias is None:
            torch.mm(chunk, weight.t(), out=into)
        else:
            torch.addmm(bias, chunk, weight.t(), out=into)
    return out.reshape(*x.shape[:-1], -1)


def fixed_elementwise(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for an elementwise ``fn``, every element through torch's SIMD loop (never the scalar tail).

    A call of up to ``GRAIN`` elements runs on one thread: padded to whole ``VECTOR`` steps. Larger tensors go in
    calls whose every thread takes a whole number of ``GRAIN`` (or one thread takes one ``GRAIN``), the last call
    overlapping the one before (the same elements give the same results)."""
    flat = x.reshape(-1)
    n = flat.numel()
    if n <= GRAIN:
        padded = flat.new_zeros(-(-n // VECTOR) * VECTOR)
        padded[:n] = flat
        return fn(padded)[:n].view(x.shape)
    threads = torch.get_num_threads()
    size = GRAIN if n < GRAIN * threads else n // (GRAIN * threads) * GRAIN * threads  # whole GRAINs per thread
    flat = flat.contiguous()
    out = torch.empty_like(flat)
    for first in range(0, n, size):
        first = min(first, n - size)
        out[first : first + size] = fn(flat[first : first + size])
    return out.view(x.shape)


class FixedChunkActivation(torch.nn.Module):
    """An activation module applied through ``fixed_elementwise``."""

    def __init__(self, act: torch.nn.Module):
        super().__init__()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fixed_elementwise(self.act, x)


def fixed_order_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension in a fixed pairwise order (zero-padded to a power of two; elementwise adds only)."""
    width = x.shape[-1]
    size = 1 << max(0, math.ceil(math.log2(width)))
    if size != width:
        x = F.pad(x, (0, size - width))
    while size > 1:
        size //= 2
        x = x[..., :size] + x[..., size:]
    return x[..., 0]


def head_rewards(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """``head(hidden)`` for a ``Linear(hidden, 1)`` head in fp32, one row independent of the others."""
    reward = fixed_order_sum(hidden.float() * head.weight[0])
    return reward + head.bias[0] if head.bias is not None else reward


@dataclass(frozen=True)
class BlockLayout:
    """Where each row's tokens sit in the batch and in their sequence, as index tensors ``block_attention`` uses.

    Query blocks are ``(row, block)`` pairs that hold at least one new token, ordered by block number descending so
    that the blocks a key block ``kb`` concerns are the first ``blocks_from[kb]`` of them.
    """

    key_row: torch.Tensor  # per real key: batch row
    key_col: torch.Tensor  # its column among the layer's keys (cached then new)
    key_pos: torch.Tensor  # its position in its sequence
    query_row: torch.Tensor  # per real query: batch row
    query_col: torch.Tensor  # its column among the new tokens
    query_block: torch.Tensor  # which query block holds it
    query_offset: torch.Tensor  # its place in that block
    block_row: torch.Tensor  # per query block: batch row
    block_start: torch.Tensor  # position of its first token
    blocks_from: tuple[int, ...]  # per key block kb: how many query blocks have a number >= kb
    key_width: int  # key blocks x BLOCK

    @classmethod
    def build(
        cls, starts: list[int], ends: list[int], *, cached_width: int, width: int, padding_side: str
    ) -> BlockLayout:
        """Rows compute ``seq[start:end]`` on top of cached ``seq[:start]`` (left-aligned in ``cached_width``
        columns); the new tokens are padded on ``padding_side`` to ``width``."""
        start = torch.tensor(starts, dtype=torch.long)
        end = torch.tensor(ends, dtype=torch.long)
        new = end - start
        first = torch.zeros_like(new) if padding_side == "right" else width - new
        key_row, key_pos = _ranges(end)  # every position 0..end-1 of every row
        cached = key_pos < start[key_row]
        key_col = torch.where(cached, key_pos, cached_width + first[key_row] + key_pos - start[key_row])
        query_row, step = _ranges(new)  # every new token
        query_pos = start[query_row] + step
        # Query blocks: (row, block number) pairs, numbers descending, then rows ascending.
        top = int(query_pos.max()) // BLOCK
        code = (top - query_pos // BLOCK) * len(starts) + query_row
        blocks, query_block = torch.unique(code, return_inverse=True)  # sorted ascending
        numbers = top - blocks // len(starts)
        at_least = torch.bincount(numbers, minlength=top + 1).flip(0).cumsum(0).flip(0)  # blocks numbered >= kb
        return cls(
            key_row=key_row,
            key_col=key_col,
            key_pos=key_pos,
            query_row=query_row,
            query_col=first[query_row] + step,
            query_block=query_block,
            query_offset=query_pos % BLOCK,
            block_row=blocks % len(starts),
            block_start=numbers * BLOCK,
            blocks_from=tuple(at_least.tolist()),
            key_width=(top + 1) * BLOCK,
        )

    def to(self, device: torch.device) -> BlockLayout:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return BlockLayout(**moved)


def _ranges(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For lengths ``[a, b, ...]``: the owner (0 x a, 1 x b, ...) and the index (0..a-1, 0..b-1, ...) of each."""
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    offsets = torch.cumsum(lengths, 0) - lengths
    return owner, torch.arange(int(lengths.sum())) - offsets[owner]


def block_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    rmserve_blocks: BlockLayout | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention over fixed key blocks counted from each sequence's start (a transformers attention function).

    ``query`` ``[rows, heads, new, dim]``, ``key``/``value`` ``[rows, kv_heads, cached + new, dim]``; returns
    ``[rows, new, heads, dim]`` in the query's dtype. Padding columns get zeros.
    """
    lay = rmserve_blocks
    if lay is None:
        raise RuntimeError("batch-invariant attention needs the runner's block layout (rmserve_blocks=...)")
    rows, heads, new, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    f32 = torch.float32
    # Keys and values at their sequence positions, in fp32: [rows, kv_heads, key blocks x BLOCK, dim].
    # The values carry a column of ones: the same matmul that sums weights x values sums the weights.
    k_seq = key.new_zeros((rows, kv_heads, lay.key_width, dim), dtype=f32)
    v_seq = key.new_ones((rows, kv_heads, lay.key_width, dim + 1), dtype=f32)
    k_seq[lay.key_row, :, lay.key_pos] = key[lay.key_row, :, lay.key_col].to(f32)
    v_seq[lay.key_row, :, lay.key_pos, :dim] = value[lay.key_row, :, lay.key_col].to(f32)
    # Queries in blocks, the heads that share a kv head stacked: [blocks, kv_heads, group x BLOCK, dim].
    n_blocks = lay.block_row.shape[0]
    q = query.new_zeros((n_blocks, heads, BLOCK, dim), dtype=f32)
    q[lay.query_block, :, lay.query_offset] = query[lay.query_row, :, lay.query_col].to(f32)
    q = q.view(n_blocks, kv_heads, group * BLOCK, dim)

    q.mul_(scale)

    # Only diagonal blocks (query block == key block) need the causal mask, unless a sliding window hides more.
    windowed = sliding_window is not None and sliding_window < lay.key_width
    offsets = torch.arange(BLOCK, device=query.device)
    q_pos = (lay.block_start[:, None] + offsets).repeat(1, group)  # [blocks, group x BLOCK]
    future = (offsets[None, :] > offsets[:, None]).repeat(group, 1)  # [group x BLOCK, BLOCK]: key after query
    peak = torch.full((n_blocks, kv_heads, group * BLOCK, 1), -math.inf, dtype=f32, device=query.device)
    acc = q.new_zeros((n_blocks, kv_heads, group * BLOCK, dim + 1))  # weighted values, then the weights' sum
    for kb, n in enumerate(lay.blocks_from):
        keys = k_seq[lay.block_row[:n], :, kb * BLOCK : (kb + 1) * BLOCK]
        values = v_seq[lay.block_row[:n], :, kb * BLOCK : (kb + 1) * BLOCK]
        scores = torch.matmul(q[:n], keys.transpose(-1, -2))
        if windowed:
            delta = q_pos[:n, :, None] - (kb * BLOCK + offsets)  # query position - key position
            scores.masked_fill_(((delta < 0) | (delta >= sliding_window))[:, None], -math.inf)
        else:  # blocks are ordered by number, descending: those with number kb are the last of the n
            diagonal = lay.blocks_from[kb + 1] if kb + 1 < len(lay.blocks_from) else 0
            scores[diagonal:].masked_fill_(future, -math.inf)
        new_peak = torch.maximum(peak[:n], scores.amax(dim=-1, keepdim=True))  # max is exact in any order
        shift = torch.where(new_peak == -math.inf, 0.0, new_peak)
        weights = scores.sub_(shift).exp_()
        rescale = torch.exp(peak[:n] - shift)
        acc[:n].mul_(rescale).add_(torch.matmul(weights, values))
        peak[:n] = new_peak
    out = (acc[..., :dim] / acc[..., dim:]).view(n_blocks, heads, BLOCK, dim)
    result = query.new_zeros((rows, new, heads, dim))
    result[lay.query_row, lay.query_col] = out[lay.query_block, :, lay.query_offset].to(query.dtype)
    return result, None


def make_batch_invariant(backbone: torch.nn.Module) -> None:
    """Swap, in place, ``backbone``'s linear layers for ``FixedRowsLinear``, its activations for
    ``FixedChunkActivation`` and its attention for ``block_attention`` (the parameters are shared, not copied).
    Idempotent."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, block_attention)
    for parent in list(backbone.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, FixedRowsLinear.wrap(child))
            elif _is_activation(child) and not isinstance(parent, FixedChunkActivation):
                setattr(parent, name, FixedChunkActivation(child))
    backbone.set_attn_implementation(ATTENTION_NAME)


def _is_activation(module: torch.nn.Module) -> bool:
    """A parameter-free activation module of torch or transformers (SiLU, GELU, ...)."""
    return type(module).__module__ in ("torch.nn.modules.activation", "transformers.activations")
