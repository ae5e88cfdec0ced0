"""How an ensemble's reward is computed from its members' rewards (pure functions), and the start-up check.

For one item, each member ``m`` with weight ``w_m > 0`` gives a raw reward ``r_m``, normalised with the member's
own statistics: ``z_m = (r_m - mean_m) / std_m`` (from its config.json or its ``reward_mean``/``reward_std``).
With ``W = sum_m w_m``:

* weighted mean    ``mu    = sum_m w_m * z_m / W``
* weighted spread  ``sigma = sqrt(sum_m w_m * (z_m - mu)^2 / W)`` (population standard deviation; 0 for one member)

and the ensemble's reward is, by ``combine``:

* ``mean``            -> ``mu``
* ``min``             -> ``min_m z_m`` (the worst case; weights do not change which member is lowest, so they do
  not enter ``min``; they still enter the reported spread)
* ``mean_minus_std``  -> ``mu - lambda * sigma`` (the uncertainty-penalised reward)

Only relative weights matter (``{a: 1, b: 1}`` and ``{a: 2, b: 2}`` are the same ensemble). Responses of native
routes report every member's ``z_m`` (``member_rewards``) and ``sigma`` (``spread``) per item; the ensemble's
reward is already in normalised units, so a request's ``normalize`` flag changes nothing for it.

Example::

    ensemble = EnsembleConfig(name="both", members={"a": 1.0, "b": 1.0}, combine="mean_minus_std", lambda_=1.0)
    combine_rewards(ensemble, {"a": [1.0], "b": [-1.0]})   # EnsembleRewards(rewards=[-1.0], spread=[1.0], ...)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rmserve.serve.config.loading import ConfigError
from rmserve.serve.config.served_models import EnsembleConfig
from rmserve.serve.config.settings import ServerConfig


@dataclass(frozen=True)
class EnsembleRewards:
    """An ensemble's rewards for a list of items: combined, the members' spread, and each member's ``z``."""

    rewards: list[float]
    spread: list[float]
    members: dict[str, list[float]]


def combine_item(ensemble: EnsembleConfig, normalized: Mapping[str, float]) -> tuple[float, float]:
    """``(reward, spread)`` of one item from its members' normalised rewards (see the module docstring)."""
    weights = ensemble.members
    total = math.fsum(weights.values())
    mu = math.fsum(w * normalized[m] for m, w in weights.items()) / total
    sigma = math.sqrt(math.fsum(w * (normalized[m] - mu) ** 2 for m, w in weights.items()) / total)
    if ensemble.combine == "mean":
        return mu, sigma
    if ensemble.combine == "min":
        return min(normalized[m] for m in weights), sigma
    return mu - ensemble.lambda_ * sigma, sigma


def combine_rewards(ensemble: EnsembleConfig, normalized: Mapping[str, Sequence[float]]) -> EnsembleRewards:
    """Combine per-member lists of normalised rewards (one entry per item, same order for every member)."""
    counts = {len(values) for values in normalized.values()}
    if len(counts) > 1 or set(normalized) != set(ensemble.members):
        raise ValueError(f"ensemble {ensemble.name!r}: every member needs one reward per item")
    count = counts.pop() if counts else 0
    pairs = [combine_item(ensemble, {m: normalized[m][i] for m in ensemble.members}) for i in range(count)]
    return EnsembleRewards(
        rewards=[reward for reward, _ in pairs],
        spread=[spread for _, spread in pairs],
        members={m: list(normalized[m]) for m in ensemble.members},
    )


def check_ensemble_members(config: ServerConfig) -> None:
    """``ConfigError`` naming the ensemble and member when a member has no normalisation statistics.

    Reads each member's config.json (no weights are loaded); a path that cannot be read is left to the Scorer,
    which fails with the loader's message (and checks the statistics again after loading).
    """
    if not config.ensembles:
        return
    by_name = {model.name: (i, model) for i, model in enumerate(config.served_models())}
    for k, ensemble in enumerate(config.ensembles):
        for member in ensemble.members:
            i, model = by_name[member]
            if model.reward_mean is not None or model.reward_std is not None:
                continue
            raw = _checkpoint_config(model.path)
            if raw is None:
                continue
            if not any(key in raw for key in ("mean", "std", "reward_mean", "reward_std")):
                raise ConfigError(
                    f"ensembles[{k}] ({ensemble.name!r}): member {member!r} (models[{i}], {model.path}) has no "
                    f"normalisation statistics; set models[{i}].reward_mean and reward_std, or add mean/std to its "
                    "config.json"
                )


def _checkpoint_config(path: str) -> dict | None:
    from rmserve.model.loading import resolve_path

    try:
        return json.loads((resolve_path(path) / "config.json").read_text())
    except Exception:  # not loadable here: the Scorer reports it
        return None
