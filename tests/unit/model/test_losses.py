"""The training objectives, checked against their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from rmserve.model.losses import bradley_terry_loss, imitation_loss, listwise_ranking_loss, regularized_objective


@pytest.mark.parametrize("delta", [-5.0, -1.0, 0.0, 0.5, 3.0])
def test_bradley_terry_equals_log_exp_form(delta):
    loss = bradley_terry_loss(torch.tensor([delta + 1.0]), torch.tensor([1.0]))
    assert float(loss) == pytest.approx(math.log1p(math.exp(-delta)), rel=1e-6)


def test_bradley_terry_is_finite_at_extremes():
    big = bradley_terry_loss(torch.tensor([100.0]), torch.tensor([0.0]))
    small = bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([0.0]))
    assert math.isfinite(float(big)) and math.isfinite(float(small))
    assert float(big) == pytest.approx(math.exp(-100), rel=1e-3)  # log(1 + e^-100) ≈ e^-100
    assert float(small) == pytest.approx(100.0, rel=1e-6)
    r = torch.tensor([-100.0], requires_grad=True)
    bradley_terry_loss(r, torch.tensor([0.0])).backward()
    assert float(r.grad) == pytest.approx(-1.0, abs=1e-6)


def test_margin_shifts_the_difference():
    rc, rr = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.0])
    with_margin = bradley_terry_loss(rc, rr, margin=torch.tensor([0.5, 1.0]), reduction="none")
    assert with_margin.tolist() == pytest.approx([math.log1p(math.exp(-0.5)), math.log1p(math.exp(0.5))], rel=1e-6)
    assert torch.all(with_margin > bradley_terry_loss(rc, rr, reduction="none"))


def test_listwise_with_two_equals_pairwise():
    r = torch.tensor([0.7, -0.2])
    assert float(listwise_ranking_loss([r])) == pytest.approx(float(bradley_terry_loss(r[:1], r[1:])), rel=1e-6)


def test_listwise_averages_all_ordered_pairs():
    r = torch.tensor([3.0, 1.0, 2.0, -1.0])
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    want = sum(math.log1p(math.exp(-(r[i] - r[j]).item())) for i, j in pairs) / len(pairs)
    got = listwise_ranking_loss([r, torch.tensor([1.0, 0.0])])
    other = math.log1p(math.exp(-1.0))
    assert float(got) == pytest.approx((want + other) / 2, rel=1e-6)
    with pytest.raises(ValueError):
        listwise_ranking_loss([torch.tensor([1.0])])


def test_imitation_loss_counts_response_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 11)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 0, 1, 1]])
    want = torch.nn.functional.cross_entropy(logits[0, 2:4], ids[0, 3:5])
    assert float(imitation_loss(logits, ids, mask)) == pytest.approx(float(want), rel=1e-6)
    assert float(regularized_objective(torch.tensor(1.0), torch.tensor(2.0), 0.25)) == pytest.approx(1.5)


def test_training_reduces_the_loss(tmp_path):
    from rmserve.model.synthetic import make_preference_pairs, make_rankings
    from rmserve.model.training import TrainConfig, train_reward_model

    records = make_preference_pairs(300, seed=5) + make_rankings(100, seed=6)
    result = train_reward_model(records, tmp_path, TrainConfig(hidden_size=32, steps=200, batch_size=16, beta=0.1))
    first, last = sum(result.losses[:20]) / 20, sum(result.losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)
