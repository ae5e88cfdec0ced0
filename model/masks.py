"""The attention mask a forward gives the backbone, from the runner's 2D mask over cached and new columns.

transformers turns a 2D mask into causal (and sliding-window) masks by **column**: a key is visible when its column
is at most the query's, and, in a sliding-window layer, less than ``sliding_window`` columns behind it. That is
right when each row's real tokens are contiguous columns. The runner's layout is not always so: cached states are
left-aligned in ``cached_width`` columns and the new tokens start after them, so a row that read fewer cached tokens
than the widest row, or whose new tokens are padded on the left, has padding columns *between* its cached and new
tokens. Full causal attention does not care (padding is masked and positions count real tokens), but a sliding
window measured in columns would cut keys that are inside the window by position: a wrong reward. For such a
forward on a model with sliding-window layers, ``backbone_mask`` builds the 4D masks from **positions** (one per
layer kind when the model mixes full and sliding layers), as transformers would for each row alone.

And where nothing is cached and rows are padded on the right, it returns all ones: under causal attention a real
token never sees the padding after it, and transformers then runs SDPA's causal kernel, which skips the scores
above the diagonal (a padding mask makes it compute the whole square: about twice the attention of a PPO batch).

Example::

    windows = SlidingWindows.of(backbone.config)        # None for a model without sliding-window layers
    backbone(..., attention_mask=backbone_mask(mask, cached_width, "right", windows, eager=False))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class SlidingWindows:
    """A model's sliding-window attention: the window (tokens) and whether full-attention layers sit beside it."""

    window: int
    mixed: bool

    @classmethod
    def of(cls, config) -> SlidingWindows | None:
        """From a transformers config: ``layer_types`` where the model has them (Gemma 2/3, Qwen2/3, gpt-oss, ...),
        else ``sliding_window`` for every layer (Mistral, Phi-3)."""
        window = getattr(config, "sliding_window", None)
        kinds = set(getattr(config, "layer_types", None) or ())
        if not window or (kinds and SLIDING not in kinds):
            return None
        return cls(int(window), mixed=FULL in kinds)


def backbone_mask(
    mask: torch.Tensor,
    cached_width: int,
    padding_side: str,
    windows: SlidingWindows | None,
    *,
    eager: bool,
    dtype: torch.dtype,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The ``attention_mask`` for a forward whose 2D ``mask`` ``[rows, cached_width + width]`` marks real columns.

    ``eager``: the model's attention adds a float mask (``dtype``'s minimum where hidden) instead of taking SDPA's
    boolean one."""
    if not cached_width:
        if padding_side == "right":
            return torch.ones_like(mask)
        return mask  # left padding, nothing cached: each row's real tokens are contiguous columns
    if windows is None or not _has_gap(mask):
        return mask
    full, sliding = _position_masks(mask, cached_width, windows.window)
    if eager:
        full, sliding = (
            torch.zeros_like(m, dtype=dtype).masked_fill_(~m, torch.finfo(dtype).min) for m in (full, sliding)
        )
    return {FULL: full, SLIDING: sliding} if windows.mixed else sliding


def _has_gap(mask: torch.Tensor) -> bool:
    """Whether some row has padding columns between real ones (its real columns are not one run)."""
    real = mask.bool()
    runs = (real[:, 1:] & ~real[:, :-1]).sum(dim=1) + real[:, 0]  # how many runs of real columns each row has
    return bool((runs > 1).any())


def _position_masks(mask: torch.Tensor, cached_width: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``[rows, 1, width, cached_width + width]`` masks, full causal and sliding-window, by position: a query
    sees the real keys at its position or before (and less than ``window`` positions back); a padding query sees only
    its own column, so no row of scores is all hidden."""
    real = mask.bool()
    position = mask.cumsum(dim=1) - 1  # each real column's position in its sequence
    query_position, query_real = position[:, cached_width:], real[:, cached_width:]
    behind = query_position[:, :, None] - position[:, None, :]  # [rows, width, columns]
    full = real[:, None, :] & (behind >= 0) & query_real[:, :, None]
    sliding = full & (behind < window)
    width = mask.shape[1] - cached_width
    own = torch.zeros_like(full)
    own[:, torch.arange(width), cached_width + torch.arange(width)] = True
    own &= ~query_real[:, :, None]
    return (full | own)[:, None], (sliding | own)[:, None]
