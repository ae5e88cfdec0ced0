"""Reward-model training objectives, as the papers behind these models define them.

* Bradley–Terry pairwise loss ``-log σ(r_c − r_r)`` (InstructGPT, Llama 2), computed with
  ``logsigmoid`` so it is finite for any margin: ``-logsigmoid(Δ) = log(1 + exp(−Δ))``.
* Margin variant ``-log σ(r_c − r_r − m)`` (Llama 2's preference-strength margin).
* Listwise loss for K ranked responses: the mean of the pairwise loss over all K·(K−1)/2 ordered
  pairs of one prompt (InstructGPT), then the mean over prompts.
* Imitation-regularised objective ``L_rank + β · CE(chosen response tokens)`` for checkpoints that
  keep an LM head.

Example::

    loss = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]))   # = log(1 + e^-1)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0, reduction: str = "mean"
) -> torch.Tensor:
    """``-log σ(r_chosen − r_rejected − margin)``, stable for any difference."""
    loss = -F.logsigmoid(r_chosen - r_rejected - margin)
    return loss.mean() if reduction == "mean" else loss


def listwise_ranking_loss(rewards: list[torch.Tensor]) -> torch.Tensor:
    """Mean over prompts of the mean pairwise loss over all ordered pairs.

    ``rewards[g]`` holds the rewards of prompt g's responses ranked best first (length K_g ≥ 2).
    """
    per_group = []
    for r in rewards:
        if r.numel() < 2:
            raise ValueError("a ranking needs at least two responses")
        better, worse = torch.triu_indices(r.numel(), r.numel(), offset=1, device=r.device)
        per_group.append(-F.logsigmoid(r[better] - r[worse]).mean())
    return torch.stack(per_group).mean()


def imitation_loss(lm_logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the response tokens only (``response_mask`` marks them)."""
    logits = lm_logits[:, :-1].float()
    targets = input_ids[:, 1:]
    mask = response_mask[:, 1:].to(logits.dtype)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (ce * mask.reshape(-1)).sum() / mask.sum().clamp(min=1.0)


def regularized_objective(ranking_loss: torch.Tensor, lm_loss: torch.Tensor, beta: float) -> torch.Tensor:
    """``L_rank + β · CE(chosen response tokens)``."""
    return ranking_loss + beta * lm_loss
