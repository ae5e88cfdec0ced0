"""Attention over a cached prompt once for all the rows that share it (cascade attention), on the CPU.

A forward of rows that continue cached prompts (a GRPO group's later samples, best-of-n candidates) would otherwise
copy each row's prompt keys and values into one padded buffer and run masked SDPA over ``prompt + new`` columns for
every row. Here each distinct prompt's states stay where the prefix cache holds them (one copy per forward at most,
when the prompt spans several cache segments), and each layer's attention is two flash calls merged by their
log-sum-exps: every query of every row that shares a prompt against that prompt's keys (no mask: a new token sees
its whole prompt; the queries of the heads that share a key/value head side by side), and each row's queries against
its own new keys, causal (rows padded on the right, so a real token never sees padding). Same rewards within
floating-point reassociation (fp32 parity tests hold at 1e-5).

Used where it is exact and measured to pay (``ForwardRunner``): the CPU, the default mode, SDPA attention without
sliding windows, right padding, and forwards whose cached columns outnumber their new ones (those are never held
for later batches, whose copying needs the cached columns in the buffer).

Example::

    prefixes = SharedPrefixes.build(pasts, device)      # the rows' cached segments, grouped by prompt
    backbone(..., cache=prefixes.cache(rows, cached_width, layers), rmserve_prefixes=prefixes)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ATTENTION_NAME = "rmserve_cascade"
SEQ_DIM = 3  # token dimension of a cache segment [layers, 2, kv_heads, tokens, head_dim]
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@dataclass(frozen=True)
class SharedPrefixes:
    """The distinct cached prompts of a forward's rows: ``groups[g]`` = (the rows that read it, its states
    ``[layers, 2, kv_heads, tokens, head_dim]``)."""

    groups: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @classmethod
    def build(cls, pasts: list[list[torch.Tensor]], device: torch.device) -> SharedPrefixes:
        """Group rows by the cache segments they read (the same prompt reads the same segments)."""
        by_prompt: dict[tuple, tuple[list[int], list[torch.Tensor]]] = {}
        for r, segments in enumerate(pasts):
            if segments:
                key = tuple((s.data_ptr(), s.shape[SEQ_DIM]) for s in segments)
                by_prompt.setdefault(key, ([], segments))[0].append(r)
        groups = tuple(
            (
                torch.tensor(rows, device=device),
                (segments[0] if len(segments) == 1 else torch.cat(segments, dim=SEQ_DIM)).to(device),
            )
            for rows, segments in by_prompt.values()
        )
        return cls(groups)

    def per_row(self, rows: int) -> tuple[torch.Tensor | None, ...]:
        """Each of ``rows`` rows' cached prompt states (None for a row that reads none)."""
        states: list[torch.Tensor | None] = [None] * rows
        for members, prompt in self.groups:
            for r in members.tolist():
                states[r] = prompt
        return tuple(states)

    def cache(self, rows: int, cached_width: int, layers: int):
        """A ``DynamicCache`` that reports ``cached_width`` cached columns (so transformers sizes its masks and
        positions as for the padded buffer) but holds none: each layer's ``update`` keeps and returns the forward's
        new keys and values alone, which ``shared_prompt_attention`` completes with the prompts'."""
        from transformers import DynamicCache

        sample = self.groups[0][1]
        _, _, kv_heads, _, dim = sample.shape
        empty = sample.new_zeros((rows, kv_heads, 0, dim))
        cache = DynamicCache(ddp_cache_data=[(empty, empty) for _ in range(layers)])
        placeholder = sample.new_zeros(()).expand(rows, kv_heads, cached_width, dim)  # a shape, no memory
        for layer in cache.layers:
            layer.keys, layer.values = placeholder, placeholder
            layer.update = _keeper(layer)
        return cache


def _keeper(layer):
    def update(key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        layer.keys, layer.values = key_states, value_states
        return key_states, value_states

    return update


def shared_prompt_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    rmserve_prefixes: SharedPrefixes | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: SDPA's, unless the runner passes ``rmserve_prefixes`` (then ``key`` and
    ``value`` are the new tokens' alone). Returns ``[rows, new, heads, head_dim]``."""
    if rmserve_prefixes is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    rows, heads, width, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    if group > 1:
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    own, own_lse = _flash(query, key, value, 0.0, True, scale=scale)  # each row's new tokens, causal
    out = own.float()
    layer = module.layer_idx
    for members, states in rmserve_prefixes.groups:
        n = members.numel()
        # [n, heads, width, dim] -> [1, kv_heads, n x group x width, dim]: every query that reads this prompt
        q = query.index_select(0, members).view(n, kv_heads, group, width, dim).transpose(0, 1)
        seen, seen_lse = _flash(
            q.reshape(1, kv_heads, n * group * width, dim), states[layer, 0][None], states[layer, 1][None], scale=scale
        )
        seen = seen.view(kv_heads, n, group, width, dim).transpose(0, 1).reshape(n, heads, width, dim)
        seen_lse = seen_lse.view(kv_heads, n, group, width).transpose(0, 1).reshape(n, heads, width)
        mine, mine_lse = out.index_select(0, members), own_lse.index_select(0, members)
        top = torch.maximum(mine_lse, seen_lse)
        a, b = (mine_lse - top).exp_(), (seen_lse - top).exp_()
        total = a + b
        merged = (mine * (a / total)[..., None]).add_(seen.float() * (b / total)[..., None])
        out.index_copy_(0, members, merged)  # a row reads one prompt: its log-sum-exp is not needed again
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def use_shared_prompt_attention(backbone: torch.nn.Module) -> bool:
    """Route ``backbone``'s SDPA attention through ``shared_prompt_attention`` (SDPA's own path unless a forward
    passes prompts); False, and nothing changed, for other attention implementations."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    config = getattr(backbone, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", ATTENTION_NAME):
        return False
    AttentionInterface.register(ATTENTION_NAME, shared_prompt_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    backbone.set_attn_implementation(ATTENTION_NAME)
    return True
