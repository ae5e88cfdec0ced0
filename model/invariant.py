"""Batch-invariant scoring: every reduction in a fixed order, so an item's reward is the same bits in any batch.

What varies on a CPU with plain torch (measured by ``benchmarks/batch_invariance.py``), and what replaces it here:

* **Linear layers.** A row of ``x @ W.T`` depends on how many rows the call has: MKL (fp32) and oneDNN (bf16) pick
  other kernels and K-blockings for other row counts. ``FixedRowsLinear`` runs every matmul as calls of exactly
  ``MATMUL_ROWS`` rows (the last call overlaps the previous one; fewer rows are zero-padded), so a token's output
  never depends on how many tokens share the forward.
* **Attention.** SDPA's reduction over keys depends on where padding puts a sequence's keys and on how many there
  are; a cached prompt changes the query and key layout again. ``block_attention`` works row by row on the row's keys
  and values **in sequence order** (cached prompt, then new tokens; fp32), ``QUERY_CHUNK`` queries at a time: scores
  ``keys @ queries.T`` (one dot product over the head dimension each), a softmax over keys (the max is exact in any
  order), then the weighted values per ``BLOCK``-token key block counted from the sequence's first token (one
  ``[queries, BLOCK] @ [BLOCK, head_dim + 1]`` product per block; a column of ones sums the weights) and a fixed
  pairwise sum over the blocks. A key block past a query's own adds exact zeros, so the row's length, the chunk, the
  batch's longest row, the padding and the prefix cache give the same sums. Soft-capped logits (Gemma 2) are capped
  score by score, the ``tanh`` through ``fixed_elementwise``; attention sinks (gpt-oss) are not computed, and such a
  model is refused (``unsupported_attention``). Every score and block product is a matmul whose query count is a
  multiple of ``QUERY_STEP`` (zero queries pad it) and whose value width (head_dim + the ones column) a multiple of
  ``VALUE_STEP`` (zero columns pad it): measured (fp32, head_dims 8-256), a score's and a block product's bits then do
  not depend on how many queries, keys or batch entries share the call, nor on the query's row in it. Without the
  padding they do on some CPUs: on an AMD EPYC (Zen 4) a score computed among 4-11 queries, and a block product of
  head_dim 8 with the ones column (9 wide), differ in the last bit from the same product in a larger call (an Intel
  Xeon showed it only below 4 queries).
* **The reward head.** ``Linear(hidden, 1)`` over the scored rows is a matrix-vector product whose kernel depends
  on the row count; ``head_rewards`` multiplies and sums the hidden size in a fixed pairwise order.
* **Activations.** torch computes SiLU (and GELU, sigmoid) with SIMD code for whole vectors and with scalar code for
  the tail of each thread's range; the two differ in the last bit, and where the tail falls depends on how many
  tokens the tensor holds. ``FixedChunkActivation`` applies them to the tensor zero-padded to a size that every
  thread's share splits into whole vectors (``fixed_elementwise``), so every element takes the SIMD path.

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

from .errors import ModelLoadError

ATTENTION_NAME = "rmserve_batch_invariant"
BLOCK = 64  # tokens per key block, counted from each sequence's first token
QUERY_CHUNK = 128  # queries per score matmul: a chunk's keys stop at its last query's block
QUERY_STEP = 16  # score and value matmuls get a multiple of this many query rows (zero-padded)
VALUE_STEP = 8  # the values' columns (head_dim + the weights' ones column), zero-padded to a multiple of this
MIN_EXPONENT = -87.0  # softmax exponents are raised to this (exp: 1.6e-38; the smallest normal fp32 is 1.2e-38)
MATMUL_ROWS = 256  # rows of every linear-layer matmul call (fewer calls: each starts the thread pool)
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

    One call on ``x`` zero-padded to ``simd_size`` elements: each thread's share a whole number of ``VECTOR`` steps."""
    flat = x.reshape(-1)
    n = flat.numel()
    size = simd_size(n)
    if size != n:
        flat = F.pad(flat, (0, size - n))
    return fn(flat)[:n].view(x.shape)


def simd_size(n: int) -> int:
    """The fewest elements (at least ``n``) that torch's parallel elementwise loop splits into whole ``VECTOR``
    steps for every thread: up to ``GRAIN`` one thread takes them all, above it ``min(threads, ceil(size /
    GRAIN))`` threads take equal shares (``at::parallel_for``)."""
    size = -(-n // VECTOR) * VECTOR
    while True:
        threads = 1 if size <= GRAIN else min(torch.get_num_threads(), -(-size // GRAIN))
        whole = -(-size // (threads * VECTOR)) * threads * VECTOR
        if whole == size:
            return size
        size = whole


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
    """Where each row's tokens sit in the layer's keys and queries, for ``block_attention``.

    Row ``r`` computes positions ``starts[r]..ends[r] - 1`` of its sequence; its new tokens are the query columns
    from ``firsts[r]`` on. Its cached keys are either the layer's key columns ``0..starts[r] - 1`` (left-aligned; the
    new tokens' keys from column ``cached_width + firsts[r]`` on) or, with ``prompts``, the row's prompt states
    ``[layers, 2, kv_heads, starts[r], head_dim]`` where the prefix cache holds them (the layer's keys are then the
    new tokens' alone, from column ``firsts[r]`` on).
    """

    starts: tuple[int, ...]
    ends: tuple[int, ...]
    firsts: tuple[int, ...]  # each row's first new token among the new-token columns (padding side)
    cached_width: int
    prompts: tuple[torch.Tensor | None, ...] | None = None

    @classmethod
    def build(
        cls,
        starts: list[int],
        ends: list[int],
        *,
        cached_width: int,
        width: int,
        padding_side: str,
        prompts: tuple[torch.Tensor | None, ...] | None = None,
    ) -> BlockLayout:
        """Rows compute ``seq[start:end]`` on top of cached ``seq[:start]`` (left-aligned in ``cached_width``
        columns, or read from ``prompts``); the new tokens are padded on ``padding_side`` to ``width``."""
        firsts = [0 if padding_side == "right" else width - (e - s) for s, e in zip(starts, ends, strict=True)]
        return cls(tuple(starts), tuple(ends), tuple(firsts), cached_width, prompts)

    def cached_states(self, r: int, layer: int, key: torch.Tensor, value: torch.Tensor):
        """Row ``r``'s cached keys and values ``[kv_heads, starts[r], head_dim]`` in ``layer``, and the column of the
        layer's ``key`` where its new tokens start."""
        start, first = self.starts[r], self.firsts[r]
        if self.prompts is None:
            return key[r, :, :start], value[r, :, :start], self.cached_width + first
        prompt = self.prompts[r]
        held = 0 if prompt is None else prompt.shape[3]
        if held != start:  # the runner's prompts are the plan's cached starts; a bug if not
            raise RuntimeError(f"row {r} starts at {start} but its cached prompt holds {held} tokens")
        if prompt is None:
            return key[r, :, :0], value[r, :, :0], first
        return prompt[layer, 0], prompt[layer, 1], first


def block_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    rmserve_blocks: BlockLayout | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention over fixed key blocks counted from each sequence's start (a transformers attention function).

    ``query`` ``[rows, heads, new, dim]``, ``key``/``value`` ``[rows, kv_heads, cached + new, dim]``; returns
    ``[rows, new, heads, dim]`` in the query's dtype. Padding columns get zeros.

    Row by row, ``QUERY_CHUNK`` queries at a time: the row's keys and values in sequence order (fp32, zero-padded to
    whole blocks), scores ``keys @ queries.T`` up to the chunk's last key block, a softmax over keys (the max is
    exact in any order), then one ``[queries, BLOCK] @ [BLOCK, dim + 1]`` product per key block (a column of ones
    sums the weights) and a fixed pairwise sum over the key blocks (``_sum_blocks_``).
    """
    lay = rmserve_blocks
    if lay is None:
        raise RuntimeError("batch-invariant attention needs the runner's block layout (rmserve_blocks=...)")
    rows, heads, width, dim = query.shape
    group = heads // key.shape[1]
    scale = dim**-0.5 if scaling is None else scaling
    result = query.new_zeros((rows, width, heads, dim))
    for r, (start, end, first) in enumerate(zip(lay.starts, lay.ends, lay.firsts, strict=True)):
        cached_key, cached_value, new_col = lay.cached_states(r, module.layer_idx, key, value)
        keys, values = _sequence_states(cached_key, cached_value, key[r], value[r], end, new_col)
        for done in range(0, end - start, QUERY_CHUNK):
            count = min(QUERY_CHUNK, end - start - done)
            cols = slice(first + done, first + done + count)
            out = _attend(query[r, :, cols], keys, values, start + done, scale, group, sliding_window, softcap)
            result[r, cols] = out.transpose(0, 1)
    return result, None


def _sequence_states(
    cached_key: torch.Tensor, cached_value: torch.Tensor, key: torch.Tensor, value: torch.Tensor, end: int, new_col: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's keys ``[kv_heads, blocks x BLOCK, dim]`` and values ``[..., value_width(dim)]`` (the head_dim values,
    a column of ones, zero columns) at their sequence positions, fp32: the cached ``[kv_heads, start, dim]``, then the
    new ones from ``key``'s column ``new_col`` on; positions from ``end`` on are zeros (no query sees them)."""
    kv_heads, start, dim = cached_key.shape
    length = -(-end // BLOCK) * BLOCK
    keys = key.new_empty((kv_heads, length, dim), dtype=torch.float32)
    values = value.new_zeros((kv_heads, length, value_width(dim)), dtype=torch.float32)
    new = slice(new_col, new_col + end - start)
    keys[:, :start], keys[:, start:end], keys[:, end:] = cached_key, key[:, new], 0.0
    values[:, :start, :dim], values[:, start:end, :dim] = cached_value, value[:, new]
    values[:, :, dim] = 1.0
    return keys, values


def value_width(dim: int) -> int:
    """Columns of a row's values in ``block_attention``: head_dim, the ones column, zeros up to ``VALUE_STEP``."""
    return -(-(dim + 1) // VALUE_STEP) * VALUE_STEP


def _attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    first_pos: int,
    scale: float,
    group: int,
    sliding_window: int | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Queries ``[heads, n, dim]`` at positions ``first_pos..`` over one row's ``_sequence_states``: ``[heads, n,
    dim]`` fp32."""
    heads, n, dim = query.shape
    kv_heads = keys.shape[0]
    m = -(-n // QUERY_STEP) * QUERY_STEP  # the matmuls' query rows: see the module's docstring
    q = (
        query.new_zeros((heads, m, dim), dtype=torch.float32)
        if m > n
        else query.new_empty((heads, m, dim), dtype=torch.float32)
    )
    q[:, :n] = query
    q = q.mul_(scale).view(kv_heads, group * m, dim)  # the heads that share a kv head side by side
    blocks = -(-(first_pos + n) // BLOCK)
    seen = blocks * BLOCK
    scores = torch.matmul(keys[:, :seen], q.transpose(1, 2))  # [kv_heads, keys, group x queries]
    if softcap is not None:  # Gemma 2: cap * tanh(score / cap), every element through the same SIMD path
        scores = fixed_elementwise(torch.tanh, scores.div_(softcap)).mul_(softcap)
    device = query.device
    if sliding_window is None or sliding_window >= first_pos + m:  # only keys after a query's position are hidden
        band = scores[:, first_pos:].view(kv_heads, seen - first_pos, group, m)
        hidden, shown = _later_keys(seen - first_pos, m, device)
        band.add_(hidden)  # -inf on the hidden scores, 0 on the others (x + 0 is x): faster than masked_fill_
    else:
        delta = first_pos + torch.arange(m, device=device) - torch.arange(seen, device=device)[:, None]
        band = scores.view(kv_heads, seen, group, m)
        shown = ((delta >= 0) & (delta < sliding_window))[:, None].float()  # query position - key position
        band.masked_fill_(shown == 0, -math.inf)
    # Every query sees its own key: the max is finite. An exp whose result underflows (or of -inf) takes the CPU's
    # slow path, 5-13x slower, and a trained model's peaked scores underflow a lot: exponents are raised to
    # MIN_EXPONENT (a weight of 1.6e-38 at least, nothing beside the max's 1), and the hidden weights are zeroed after.
    weights = scores.sub_(scores.amax(dim=1, keepdim=True)).clamp_(min=MIN_EXPONENT).exp_()
    band.mul_(shown)
    per_block = block_products(
        weights.view(kv_heads, blocks, BLOCK, group * m),
        values[:, :seen].view(kv_heads, blocks, BLOCK, values.shape[-1]),
    )  # [kv_heads, blocks, group x queries, value_width]: each block's weighted values and the weights' sum
    total = _sum_blocks_(per_block, blocks)
    return (total[..., :dim] / total[..., dim : dim + 1]).view(heads, m, dim)[:, :n]


def block_products(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``weights[b].T @ values[b]`` for each key block ``b``: ``[..., BLOCK, queries]`` and ``[..., BLOCK, columns]``
    give ``[..., queries, columns]``, a block's bits whatever the other blocks.

    Never as a batch of one: torch runs a batch of several products one per thread, each on one thread, but a lone
    product as one GEMM over all the threads, whose split (from 4 threads up, measured on an AMD EPYC) sums in
    another order. A lone block gets a zero block beside it."""
    if weights[..., 0, 0].numel() == 1:
        lone, block = weights.reshape(weights.shape[-2:]), values.reshape(values.shape[-2:])
        pair = torch.matmul(torch.stack([lone, lone.new_zeros(lone.shape)]).mT, torch.stack([block, block]))
        return pair[:1].view(*weights.shape[:-2], *pair.shape[1:])
    return torch.matmul(weights.transpose(-1, -2), values)


_LATER_KEYS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _later_keys(keys: int, queries: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two ``[keys, 1, queries]`` fp32 masks for key ``i`` and query ``j``: -inf where the key comes after the query
    (``i > j``), else 0; and 0 there, else 1. Views of two triangles per device (no new tensors per call): a chunk's
    keys past its first query are at most ``QUERY_CHUNK + BLOCK``, so they stay 1,024 square (4 MB each)."""
    cached = _LATER_KEYS.get(device)
    size = max(keys, queries)
    if cached is None or cached[0].shape[0] < size:
        size = 1 << max(10, (size - 1).bit_length())
        index = torch.arange(size, device=device)
        later = index[:, None] > index
        cached = torch.zeros((size, size), device=device).masked_fill_(later, -math.inf), (~later).float()
        _LATER_KEYS[device] = cached
    return cached[0][:keys, None, :queries], cached[1][:keys, None, :queries]


def _sum_blocks_(per_block: torch.Tensor, count: int) -> torch.Tensor:
    """The sum over dim 1 in ``fixed_order_sum``'s pairwise order (zero-padded to a power of two), in place.

    A query's blocks past its own are exact zeros, and adding zeros changes no bits: its sum is the pairwise sum of
    its own blocks 0..b, whatever ``count`` (the row's length, the chunk) is."""
    size = 1 << max(0, math.ceil(math.log2(count)))
    while size > 1:
        size //= 2
        if count > size:
            per_block[:, : count - size].add_(per_block[:, size:count])
            count = size
    return per_block[:, 0]


def make_batch_invariant(backbone: torch.nn.Module) -> None:
    """Swap, in place, ``backbone``'s linear layers for ``FixedRowsLinear``, its activations for
    ``FixedChunkActivation`` and its attention for ``block_attention`` (the parameters are shared, not copied).
    Idempotent."""
    from transformers import AttentionInterface

    unsupported = unsupported_attention(backbone)
    if unsupported:
        raise ModelLoadError(
            f"batch_invariant: this model's attention uses {unsupported}, which the fixed-block attention does not "
            "compute; serve it with batch_invariant off"
        )
    AttentionInterface.register(ATTENTION_NAME, block_attention)
    for parent in list(backbone.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, FixedRowsLinear.wrap(child))
            elif _is_activation(child) and not isinstance(parent, FixedChunkActivation):
                setattr(parent, name, FixedChunkActivation(child))
    backbone.set_attn_implementation(ATTENTION_NAME)


def unsupported_attention(backbone: torch.nn.Module) -> str | None:
    """What ``block_attention`` would silently leave out of this backbone's attention, if anything: attention sinks
    (gpt-oss)."""
    if any(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in backbone.modules()):
        return "attention sinks"
    return None


def _is_activation(module: torch.nn.Module) -> bool:
    """A parameter-free activation module of torch or transformers (SiLU, GELU, ...)."""
    return type(module).__module__ in ("torch.nn.modules.activation", "transformers.activations")
