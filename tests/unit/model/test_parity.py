"""Rewards equal transformers' own single-sequence forward, for every head format and padding side."""

from __future__ import annotations

import pytest
from checkpoints import MORE_ARCHS, WINDOWED_ARCHS

from rmserve.model import load_reward_model

FP32_TOL = 1e-5

ITEMS = [
    {"prompt": "Tell me about cats.", "response": "Gladly! Cats are loved by many people."},
    {"prompt": "Why are rockets interesting?", "response": "Go away."},
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Can you explain poetry to me? I have a question about poetry."},
        ],
        "response": "Of course. Poetry has a long history and has inspired many stories, thank you for asking.",
    },
    {"messages": [{"role": "user", "content": "Tea?"}, {"role": "assistant", "content": "Tea is lovely."}]},
    {"text": "Bees change with the seasons."},
    {"input_ids": [1, 9, 17, 33, 5, 8, 12, 40, 41, 42, 43, 2]},
]


def _check(rm, ref, items, tol=FP32_TOL):
    from checkpoints import reference_reward

    tokenized = [rm.tokenize(it, i) for i, it in enumerate(items)]
    assert len({len(t) for t in tokenized}) > 3, "the batch must mix lengths"
    got = rm.score(items)
    want = [reference_reward(ref, t.input_ids) for t in tokenized]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=tol)
    return got


@pytest.mark.parametrize("head_format", ["score", "reward_head", "v_head_file", "value_head"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_every_head_format_matches_reference(checkpoint_factory, head_format, padding_side, device):
    path, ref, _ = checkpoint_factory(head_format)
    rm = load_reward_model(str(path), dtype="fp32", device=device, padding_side=padding_side, max_batch_tokens=10_000)
    assert rm.head_name == head_format.replace("_file", "")
    _check(rm, ref, ITEMS)


def test_formats_share_weights_so_rewards_agree(checkpoint_factory, device):
    rewards = [
        load_reward_model(str(checkpoint_factory(fmt)[0]), device=device, dtype="fp32").score(ITEMS)
        for fmt in ("score", "reward_head", "v_head_file", "value_head")
    ]
    for other in rewards[1:]:
        assert other == pytest.approx(rewards[0], abs=FP32_TOL)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_pad_token_equal_to_eos(checkpoint_factory, padding_side, device):
    """With pad == eos and items ending in EOS, the last real token still comes from the mask."""
    path, ref, tok = checkpoint_factory("score", tok_variant="pad_eos")
    assert tok.pad_token_id == tok.eos_token_id
    rm = load_reward_model(str(path), device=device, dtype="fp32", padding_side=padding_side)
    ends_in_eos = [rm.tokenize(it, i).input_ids[-1] == tok.eos_token_id for i, it in enumerate(ITEMS[:4])]
    assert all(ends_in_eos)
    _check(rm, ref, ITEMS)


def test_pad_eq_eos_guess_would_be_wrong(checkpoint_factory, device):
    """Sanity of the fixture: transformers' pad-id guess picks another token than ours for such items."""
    import torch

    path, ref, tok = checkpoint_factory("score", tok_variant="pad_eos")
    rm = load_reward_model(str(path), device=device, dtype="fp32")
    ids = list(rm.tokenize(ITEMS[0]).input_ids)
    with torch.no_grad():
        guessed = float(ref(torch.tensor([ids])).logits[0, 0])  # pad_token_id set: the EOS is taken as padding
    assert abs(guessed - rm.score([ITEMS[0]])[0]) > 1e-3


@pytest.mark.parametrize("arch", ["mistral", "qwen2", *WINDOWED_ARCHS, *MORE_ARCHS])
def test_other_decoder_architectures(checkpoint_factory, arch, device):
    path, ref, _ = checkpoint_factory("score", arch=arch)
    rm = load_reward_model(str(path), device=device, dtype="fp32", padding_side="left")
    _check(rm, ref, ITEMS)


def test_raw_template_without_chat_template(checkpoint_factory, device):
    path, ref, tok = checkpoint_factory("reward_head", tok_variant="raw")
    rm = load_reward_model(str(path), device=device, dtype="fp32")
    assert rm.info()["template"] == "raw"
    joined = tok("Tell me about cats.\nGladly! Cats are loved by many people.")["input_ids"]
    assert list(rm.tokenize(ITEMS[0]).input_ids) == joined
    _check(rm, ref, ITEMS)
