"""Reward-model formats loaded without trust_remote_code: each equals a plain transformers + torch forward of the same
checkpoint (fp32, 1e-5), detected from the checkpoint and the model's settings."""

from __future__ import annotations

import pytest
import torch

from rmserve.model import load_reward_model
from rmserve.model.heads import ScoreHead

TOL = 1e-5


@pytest.fixture(scope="module")
def format_checkpoint(tmp_path_factory):
    """``make(fmt) -> (dir, reference, tokenizer)``, each format built once per module."""
    from prm_checkpoints import save_format_checkpoint

    cache: dict = {}

    def make(fmt: str):
        if fmt not in cache:
            cache[fmt] = save_format_checkpoint(tmp_path_factory.mktemp(fmt), fmt)
        return cache[fmt]

    return make


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_qwen2_reward_model_mlp_head_matches_reference(format_checkpoint, padding_side):
    out, reference, tok = format_checkpoint("qwen2_rm")
    rm = load_reward_model(str(out), dtype="fp32", device="cpu", padding_side=padding_side, forward_overhead_tokens=0)
    assert rm.reward_format.name == "reward-model-mlp" and not rm.reward_format.process
    assert isinstance(rm.engine.head, ScoreHead) and rm.head_name == "score_mlp"
    items = [
        {"prompt": "What is 2+2?", "response": "It is 4."},
        {"prompt": "What is 2+2?", "response": "Four, since two and two make four."},
        {"prompt": "Name a bird.", "response": "An owl."},
    ]
    tokenized = [rm.tokenize(item, i).input_ids for i, item in enumerate(items)]
    want = [float(reference(ids)[-1]) for ids in tokenized]
    assert rm.score(items) == pytest.approx(want, abs=TOL)
    assert max(want) - min(want) > 1e-3  # the rewards differ: the comparison means something
    info = rm.info()
    assert info["kind"] == "outcome" and "step_separator" not in info


def test_qwen2_reward_model_batch_invariant_mode(format_checkpoint):
    out, reference, _ = format_checkpoint("qwen2_rm")
    rm = load_reward_model(str(out), dtype="fp32", device="cpu", batch_invariant=True, forward_overhead_tokens=0)
    items = [{"text": "Owls hunt at night."}, {"text": "Tea is brewed from leaves, then served hot."}]
    together = rm.score(items)
    alone = [rm.score([item])[0] for item in items]
    assert together == alone  # the same bits whatever the batch
    want = [float(reference(rm.tokenize(item).input_ids)[-1]) for item in items]
    assert together == pytest.approx(want, abs=TOL)


def test_mlp_head_equals_torch_sequential(format_checkpoint):
    out, _, _ = format_checkpoint("qwen2_rm")
    rm = load_reward_model(str(out), dtype="fp32", device="cpu", forward_overhead_tokens=0)
    head = rm.engine.head
    x = torch.randn(5, head.layers[0].in_features)
    with torch.no_grad():
        plain = head.layers[2](torch.relu(head.layers[0](x)))
        assert torch.allclose(head(x), plain, atol=1e-6)
        assert torch.allclose(head.forward_invariant(x), plain, atol=1e-5)
