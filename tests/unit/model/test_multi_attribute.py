"""Multi-attribute heads (issue 19 item 4): a *ForSequenceClassification checkpoint with several labels returns every
attribute by its id2label name, equal to transformers' logits (fp32, 1e-5), and a reward that is their weighted sum
(attribute_weights; default their mean), which is what normalisation, ensembles and telemetry see."""

from __future__ import annotations

import pytest
from prm_checkpoints import ATTRIBUTES as NAMES
from prm_checkpoints import save_attribute_checkpoint

from rmserve.model import ModelLoadError, load_reward_model
from rmserve.model.heads import AttributedReward

TOL = 1e-5
ITEMS = [
    {"prompt": "Tell me about owls.", "response": "Owls hunt at night."},
    {"prompt": "Tell me about tea.", "response": "Tea is brewed from leaves, then served hot with a little milk."},
    {"text": "Rockets."},
]


@pytest.fixture(scope="module")
def attribute_checkpoint(tmp_path_factory):
    return save_attribute_checkpoint(tmp_path_factory.mktemp("multi-attribute"))


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_attributes_equal_transformers_logits_and_the_reward_is_their_weighted_sum(attribute_checkpoint, padding_side):
    out, reference = attribute_checkpoint
    weights = {"helpfulness": 0.5, "correctness": 1.0}  # verbosity left out: weight 0
    rm = load_reward_model(
        str(out), dtype="fp32", device="cpu", padding_side=padding_side, attribute_weights=weights,
        forward_overhead_tokens=0,
    )  # fmt: skip
    assert rm.reward_format.name == "multi-attribute" and rm.info()["attributes"] == {**weights, "verbosity": 0.0}
    rewards = rm.score(ITEMS)
    for reward, item in zip(rewards, ITEMS, strict=True):
        want = dict(zip(NAMES, reference(rm.tokenize(item).input_ids), strict=True))
        assert isinstance(reward, AttributedReward)
        assert reward.attributes == pytest.approx(want, abs=TOL)
        assert reward == pytest.approx(0.5 * want["helpfulness"] + 1.0 * want["correctness"], abs=TOL)


def test_default_weights_are_the_mean_and_the_batch_invariant_mode_keeps_them(attribute_checkpoint):
    out, reference = attribute_checkpoint
    rm = load_reward_model(str(out), dtype="fp32", device="cpu", batch_invariant=True, forward_overhead_tokens=0)
    together = rm.score(ITEMS)
    alone = [rm.score([item])[0] for item in ITEMS]
    assert together == alone and [r.attributes for r in together] == [r.attributes for r in alone]
    for reward, item in zip(together, ITEMS, strict=True):
        want = reference(rm.tokenize(item).input_ids)
        assert reward == pytest.approx(sum(want) / len(want), abs=TOL)


def test_unknown_attribute_weight_names_are_a_load_error(attribute_checkpoint):
    out, _ = attribute_checkpoint
    with pytest.raises(ModelLoadError, match="honesty"):
        load_reward_model(str(out), dtype="fp32", device="cpu", attribute_weights={"honesty": 1.0})


def test_attributed_reward_is_a_float_that_pickles_with_its_attributes():
    import pickle

    reward = AttributedReward(0.25, {"a": 1.0, "b": -0.5})
    again = pickle.loads(pickle.dumps(reward))
    assert again == 0.25 and again.attributes == {"a": 1.0, "b": -0.5} and again + 1 == 1.25
