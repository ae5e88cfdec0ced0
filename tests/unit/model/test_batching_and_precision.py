"""Batch invariance, reduced precision and quantisation against fp32."""

from __future__ import annotations

import random

import pytest
import torch

from rmserve.model import load_reward_model
from rmserve.model.demo import heldout_pairs

BATCH_TOL = 1e-5
BF16_TOL = 0.25  # absolute, on the demo's reward scale of about ±8 (measured max error 0.08)
FP16_TOL = 0.10  # measured max error 0.03


def _pair_items(pairs):
    chosen = [{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs]
    rejected = [{"prompt": p["prompt"], "response": p["rejected"]} for p in pairs]
    return chosen, rejected


def test_reward_does_not_depend_on_batch_or_budget(demo_model):
    rng = random.Random(3)
    pairs = heldout_pairs(60)
    items = [it for pair in zip(*_pair_items(pairs), strict=True) for it in pair]
    target = items[0]
    alone = demo_model.score([target])[0]
    original = demo_model.engine.max_batch_tokens
    try:
        for budget in (16, 64, 300, 100_000):
            demo_model.engine.max_batch_tokens = budget
            for _ in range(3):
                others = rng.sample(items[1:], rng.randint(1, 40))
                batch = others + [target]
                rng.shuffle(batch)
                got = demo_model.score(batch)[batch.index(target)]
                assert got == pytest.approx(alone, abs=BATCH_TOL)
    finally:
        demo_model.engine.max_batch_tokens = original


def test_microbatches_respect_the_token_budget(demo_model, unshared):
    items = _pair_items(heldout_pairs(50))[0]
    lengths = sorted(len(demo_model.tokenize(it)) for it in items)
    original = demo_model.engine.max_batch_tokens
    demo_model.engine.max_batch_tokens = 200
    try:
        before = demo_model.engine.stats.microbatches
        demo_model.score(items)
        assert demo_model.engine.stats.microbatches - before >= sum(lengths) // 200
        sizes = demo_model.engine.stats.last_microbatch_sizes
        unique = len({tuple(demo_model.tokenize(it).input_ids) for it in items})  # duplicates are scored once
        assert sum(sizes) == unique and max(sizes) * lengths[0] <= 200 + lengths[-1]
    finally:
        demo_model.engine.max_batch_tokens = original


@pytest.mark.parametrize(("dtype", "tol"), [("bf16", BF16_TOL), ("fp16", FP16_TOL)])
def test_half_precision_agrees_with_fp32(demo_model, demo_model_dir, dtype, tol, device):
    items = [it for pair in zip(*_pair_items(heldout_pairs(80)), strict=True) for it in pair]
    low = load_reward_model(str(demo_model_dir), dtype=dtype, device=device)
    assert low.engine.head.weight.dtype == torch.float32  # the head always runs in fp32
    for a, b in zip(low.score(items), demo_model.score(items), strict=True):
        assert a == pytest.approx(b, abs=tol)


@pytest.mark.parametrize(("quantization", "min_agreement"), [("int8", 0.95), ("nf4", 0.90)])
def test_quantized_preferences_agree_with_fp32(demo_model, demo_model_dir, quantization, min_agreement, device):
    import bitsandbytes as bnb

    chosen, rejected = _pair_items(heldout_pairs(200))
    q = load_reward_model(str(demo_model_dir), quantization=quantization, device=device, dtype="fp32")
    layer_types = {type(m) for m in q.engine.backbone.modules()}
    assert layer_types & {bnb.nn.Linear8bitLt, bnb.nn.Linear4bit}, "the backbone must really be quantised"
    assert type(q.engine.head) is torch.nn.Linear and q.engine.head.weight.dtype == torch.float32
    base = [c > r for c, r in zip(demo_model.score(chosen), demo_model.score(rejected), strict=True)]
    quant = [c > r for c, r in zip(q.score(chosen), q.score(rejected), strict=True)]
    agreement = sum(a == b for a, b in zip(base, quant, strict=True)) / len(base)
    print(f"{quantization}: preference agreement with fp32 = {agreement:.3f}")
    assert agreement >= min_agreement
