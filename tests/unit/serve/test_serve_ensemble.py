"""Issue 12: an ensemble's reward from its members' normalised rewards, against the formula written out with numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rmserve.serve.config.served_models import EnsembleConfig
from rmserve.serve.routing.ensemble import combine_item, combine_rewards

WEIGHTS = {"helpful": 1.0, "safe": 3.0, "honest": 0.5}


def offline(z: np.ndarray, w: np.ndarray, combine: str, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """rows = items, columns = members: (reward, spread) as the README defines them."""
    mu = (z * w).sum(axis=1) / w.sum()
    sigma = np.sqrt((w * (z - mu[:, None]) ** 2).sum(axis=1) / w.sum())
    reward = {"mean": mu, "min": z.min(axis=1), "mean_minus_std": mu - lam * sigma}[combine]
    return reward, sigma


@pytest.mark.parametrize("combine", ["mean", "min", "mean_minus_std"])
def test_combined_rewards_equal_the_offline_formula(combine):
    rng = np.random.default_rng(3)
    z = rng.normal(size=(50, len(WEIGHTS)))
    ensemble = EnsembleConfig(name="e", members=WEIGHTS, combine=combine, lambda_=0.7)
    result = combine_rewards(ensemble, {m: list(z[:, k]) for k, m in enumerate(WEIGHTS)})
    reward, sigma = offline(z, np.array(list(WEIGHTS.values())), combine, 0.7)
    np.testing.assert_allclose(result.rewards, reward, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.spread, sigma, rtol=0, atol=1e-12)
    assert result.members == {m: list(z[:, k]) for k, m in enumerate(WEIGHTS)}


def test_only_relative_weights_matter_and_min_ignores_them():
    values = {"a": 1.0, "b": -1.0}
    one = EnsembleConfig(name="e", members={"a": 1.0, "b": 1.0}, combine="mean_minus_std", lambda_=1.0)
    two = EnsembleConfig(name="e", members={"a": 2.0, "b": 2.0}, combine="mean_minus_std", lambda_=1.0)
    assert combine_item(one, values) == combine_item(two, values) == (-1.0, 1.0)
    skewed = EnsembleConfig(name="e", members={"a": 9.0, "b": 1.0}, combine="min")
    assert combine_item(skewed, values)[0] == -1.0
    assert combine_item(skewed, values)[1] == pytest.approx(math.sqrt(0.9 * 0.2**2 + 0.1 * 1.8**2), abs=1e-12)


def test_one_member_has_no_spread():
    ensemble = EnsembleConfig(name="e", members={"a": 2.0}, combine="mean_minus_std", lambda_=5.0)
    assert combine_item(ensemble, {"a": 0.25}) == (0.25, 0.0)


def test_lambda_is_spelled_lambda_in_the_config():
    raw = {"name": "e", "members": {"a": 1}, "combine": "mean_minus_std", "lambda": 2}
    ensemble = EnsembleConfig.model_validate(raw)
    assert ensemble.lambda_ == 2.0
    with pytest.raises(ValueError):
        EnsembleConfig.model_validate({"name": "e", "members": {"a": 0.0}})  # weights are > 0


def test_members_must_all_answer_for_every_item():
    ensemble = EnsembleConfig(name="e", members={"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="one reward per item"):
        combine_rewards(ensemble, {"a": [1.0, 2.0], "b": [1.0]})
    with pytest.raises(ValueError, match="one reward per item"):
        combine_rewards(ensemble, {"a": [1.0]})
