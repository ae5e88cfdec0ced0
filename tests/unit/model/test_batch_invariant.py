"""Batch-invariant mode: an item's reward is the same bits alone, in any batch, with either padding side, over any
micro-batch split, OOM split, prefix- or reward-cache hit or miss, and after a restart; with the mode off nothing
changes."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
from checkpoints import ARCHS, HEAD_FORMATS, reference_reward, unshared_rewards

from rmserve.model import load_reward_model
from rmserve.model.cascade import ATTENTION_NAME as CASCADE
from rmserve.model.errors import ModelLoadError
from rmserve.model.invariant import (
    BLOCK,
    QUERY_STEP,
    FixedRowsLinear,
    block_products,
    fixed_order_sum,
    value_width,
)
from rmserve.model.planning import common_prefix_length

FP32_TOL = 1e-5  # the invariant path still computes what transformers computes
BUDGETS = (40, 150, 600, 16384)  # max_batch_tokens: from one row per forward to everything in one


def load(path, dtype: str, device: str, **extra):
    """An invariant-mode model; overhead 0 shares every common prefix (the most cached-prompt paths)."""
    return load_reward_model(
        str(path), dtype=dtype, device=device, batch_invariant=True, forward_overhead_tokens=0, **extra
    )


def targets_and_neighbours(rng: random.Random, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """Targets: groups sharing prompts that end inside and across key blocks (some longer than two blocks),
    items sharing nothing, an item that is a strict prefix of another. Neighbours: random lengths, some sharing a
    target's prompt."""

    def rand(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    targets = []
    for prompt_len in (BLOCK - 3, BLOCK + 20, 2 * BLOCK + 5):
        prompt = rand(prompt_len)
        targets += [prompt + rand(rng.randint(1, 40)) for _ in range(3)]
    targets += [rand(n) for n in (1, 7, BLOCK, BLOCK + 1, 150)]
    targets.append(targets[0][: len(targets[0]) - 2])
    neighbours = [rand(rng.randint(1, 180)) for _ in range(12)]
    neighbours += [t[: rng.randint(1, len(t))] + rand(rng.randint(1, 30)) for t in rng.sample(targets, 4)]
    return targets, neighbours


def oom_above(rows: int):
    def inject(count: int, _longest: int) -> None:
        if count > rows:
            raise torch.OutOfMemoryError("injected")

    return inject


# (padding side, max_batch_tokens, per-forward overhead, caches emptied first (reward cache size), OOM above rows):
# one padded forward of everything, many micro-batches, OOM splits, cold and warm prefix and reward caches.
SCHEDULE = (
    ("right", 16384, 400, 0, None),
    ("left", 150, 0, None, None),
    ("right", 600, 50, None, 2),
    ("left", 16384, 400, 1000, None),
    ("right", 40, 50, None, None),
    ("left", 600, 400, None, 1),
)


def assert_batch_invariant(rm, targets, neighbours, seed: int) -> list[float]:
    """Every target's reward in random batches equals its reward alone, bit for bit; returns the rewards alone."""
    engine = rm.engine
    alone = [unshared_rewards(engine, [t])[0] for t in targets]  # (a) one item, one forward, no caches
    rng = random.Random(seed)
    for trial, (side, budget, overhead, reset, oom) in enumerate(SCHEDULE):
        if reset is not None:
            engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=1 << 26, reward_cache_items=reset)
        engine.padding_side, engine.max_batch_tokens, engine.overhead_tokens = side, budget, overhead  # (c), (d)
        engine.fault_injector = oom_above(oom) if oom else None
        picked = rng.sample(range(len(targets)), rng.randint(1, len(targets)))
        batch = [targets[k] for k in picked] + rng.sample(neighbours, rng.randint(0, len(neighbours)))  # (b)
        order = list(range(len(batch)))
        rng.shuffle(order)
        got = engine.score_batch([batch[i] for i in order])
        by_input = {i: got[j] for j, i in enumerate(order)}
        for slot, k in enumerate(picked):
            assert by_input[slot] == alone[k], f"trial {trial}: target {k} {by_input[slot]!r} != alone {alone[k]!r}"
    engine.fault_injector = None
    # one item per batch, as per-sample requests arrive: a group's second sample copies the prompt's states out of
    # the first sample's held forward, the third reads them from the prefix cache
    engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=1 << 26, reward_cache_items=0)
    hits = engine.stats.prefix_hits
    for k, target in enumerate(targets):
        assert engine.score_batch([target]) == [alone[k]], f"one per batch: target {k}"
    sharing = [k for k, t in enumerate(targets) if any(common_prefix_length(t, u) >= 16 for u in targets[:k])]
    assert engine.stats.prefix_hits - hits >= len(sharing)  # each that shares a block with an earlier one
    stats = engine.stats
    # the cached-prompt path, reward-cache answers and an OOM split really ran
    assert stats.prefix_hits > 0 and stats.reward_cache_hits > 0 and stats.oom_splits > 0
    assert stats.padded_tokens > stats.real_tokens  # and padding
    return alone


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize(("arch", "head_format"), [(a, h) for a in ARCHS for h in HEAD_FORMATS])
def test_every_reward_is_bitwise_its_reward_alone(checkpoint_factory, arch, head_format, dtype, device):
    path, ref, tok = checkpoint_factory(head_format, arch=arch)
    seed = ARCHS.index(arch) * 10 + HEAD_FORMATS.index(head_format)
    targets, neighbours = targets_and_neighbours(random.Random(seed), len(tok))
    alone = assert_batch_invariant(load(path, dtype, device), targets, neighbours, seed)
    restarted = load(path, dtype, device, padding_side="left")  # (e) a fresh load
    assert restarted.engine.score_batch(targets) == alone
    if dtype == "fp32":  # invariant, and still the reward transformers computes
        assert alone == pytest.approx([reference_reward(ref, t) for t in targets], abs=FP32_TOL)


@pytest.mark.parametrize("threads", [4, 16])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_one_key_value_head_on_many_threads_is_bitwise(checkpoint_factory, dtype, threads, torch_threads):
    """One key/value head (MQA, head_dim 64) on 4 and 16 threads: a chunk that sees one key block then has a lone
    block product (``block_products`` pairs it: a lone product runs as one GEMM split over the threads, which a probe
    measured to sum in another order from 4 threads up). Rewards the same bits in any batch, warm or cold caches, at
    that thread count."""
    torch_threads(threads)
    path, ref, tok = checkpoint_factory("score", arch="llama-mqa")
    targets, neighbours = targets_and_neighbours(random.Random(threads), len(tok))
    alone = assert_batch_invariant(load(path, dtype, "cpu"), targets, neighbours, threads)
    if dtype == "fp32":
        assert alone == pytest.approx([reference_reward(ref, t) for t in targets], abs=FP32_TOL)


def test_peaked_attention_stays_exact_and_invariant(checkpoint_factory):
    """A trained model's peaked attention: many of a query's scores lie more than 87 below its max, where exp
    underflows (the mode raises those exponents to MIN_EXPONENT, off the CPU's slow path, and zeroes hidden keys after
    the exp). Queries scaled 3,000x: about a quarter of the scores underflow (measured). Rewards stay the same bits in
    any batch, and transformers' within 2e-5 of their size: scores 3,000x larger carry 3,000x larger rounding
    (measured 7e-6 of it, before and after the raised exponents)."""
    path, ref, tok = checkpoint_factory("score")
    ref = copy.deepcopy(ref)
    rm = load(path, "fp32", "cpu")
    for model in (ref, rm.engine.backbone):
        for name, param in model.named_parameters():
            if name.endswith("q_proj.weight"):
                param.data.mul_(3000.0)
    targets, neighbours = targets_and_neighbours(random.Random(7), len(tok))
    alone = assert_batch_invariant(rm, targets, neighbours, 7)
    assert alone == pytest.approx([reference_reward(ref, t) for t in targets], abs=FP32_TOL, rel=2e-5)


@pytest.mark.parametrize("arch", ["mistral-window", "qwen2-window", "gemma2"])
def test_sliding_windows_and_soft_capping_are_bitwise_and_exact(checkpoint_factory, arch, device):
    """Windows measured by position; Gemma 2's logit soft-capping (cap x tanh(score / cap)) applied per score."""
    path, ref, tok = checkpoint_factory("score", arch=arch)
    targets, neighbours = targets_and_neighbours(random.Random(5), len(tok))
    alone = assert_batch_invariant(load(path, "fp32", device), targets, neighbours, 5)
    assert alone == pytest.approx([reference_reward(ref, t) for t in targets], abs=FP32_TOL)


def test_attention_the_fixed_blocks_do_not_compute_is_refused_at_load(checkpoint_factory):
    """gpt-oss adds a learned sink to each head's softmax; the fixed-block attention would leave it out (a wrong
    reward), so the invariant mode refuses the model by name of what it lacks, and the default mode serves it."""
    path, ref, _ = checkpoint_factory("score", arch="gpt_oss")
    with pytest.raises(ModelLoadError, match="attention sinks"):
        load_reward_model(str(path), dtype="fp32", batch_invariant=True)
    ids = [1, 9, 17, 33, 5, 8, 12, 40, 41, 42, 43, 2]
    default = load_reward_model(str(path), dtype="fp32")
    assert default.engine.score_batch([ids]) == pytest.approx([reference_reward(ref, ids)], abs=FP32_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seed", [101, 102, 103])
def test_more_random_batches_stay_bitwise(checkpoint_factory, arch, dtype, seed, device):
    path, _, tok = checkpoint_factory("score", arch=arch)
    targets, neighbours = targets_and_neighbours(random.Random(seed), len(tok))
    rng = random.Random(seed)
    neighbours += [[rng.randrange(3, len(tok)) for _ in range(rng.randint(200, 400))] for _ in range(4)]
    rm = load(path, dtype, device)
    alone = assert_batch_invariant(rm, targets, neighbours, seed)
    assert assert_batch_invariant(rm, targets, neighbours, seed + 1) == alone  # warm caches from the first pass


def _demo_items(n_groups: int = 4, per_group: int = 4) -> list[dict]:
    from rmserve.model.demo import heldout_pairs

    pairs = heldout_pairs(n_groups * per_group)
    items = [{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs]
    for g in range(n_groups):  # GRPO-like: one prompt, several responses
        prompt = pairs[g]["prompt"]
        items += [{"prompt": prompt, "response": p["rejected"]} for p in pairs[g * per_group : (g + 1) * per_group]]
    return items


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_demo_model_text_items_are_batch_invariant(demo_model_dir, demo_model, dtype, device):
    rm = load(demo_model_dir, dtype, device)
    items = _demo_items()
    targets = [list(rm.tokenize(it).input_ids) for it in items]
    rng = random.Random(5)
    neighbours = [[rng.randrange(3, 700) for _ in range(rng.randint(1, 200))] for _ in range(8)]
    alone = assert_batch_invariant(rm, targets, neighbours, seed=11)
    assert rm.score(items) == alone  # through the public API (reward cache, duplicates)
    assert load(demo_model_dir, dtype, device).score(items) == alone  # (e)
    if dtype == "fp32":
        assert alone == pytest.approx(demo_model.score(items), abs=FP32_TOL)


def test_default_mode_keeps_todays_path(demo_model):
    """Mode off: plain nn.Linear, SDPA attention (on the CPU through the shared-prompt dispatch, which is SDPA
    unless a forward continues cached prompts), no invariant marker in the model card."""
    backbone = demo_model.engine.backbone
    assert not demo_model.engine.batch_invariant and demo_model.info()["batch_invariant"] is False
    assert not any(isinstance(m, FixedRowsLinear) for m in backbone.modules())
    assert backbone.config._attn_implementation in ("sdpa", CASCADE)


def test_invariant_mode_is_reported_and_survives_a_new_backbone(demo_model_dir):
    rm = load(demo_model_dir, "fp32", "cpu")
    assert rm.info()["batch_invariant"] is True
    seq = list(rm.tokenize({"prompt": "Tell me about owls.", "response": "Owls hunt at night."}).input_ids)
    before = unshared_rewards(rm.engine, [seq])
    fresh = load_reward_model(str(demo_model_dir), dtype="fp32", device="cpu", forward_overhead_tokens=0)
    rm.engine.runner.backbone = fresh.engine.backbone  # what a reload (wake from sleep level 2) does
    assert any(isinstance(m, FixedRowsLinear) for m in rm.engine.backbone.modules())
    assert unshared_rewards(rm.engine, [seq]) == before


@pytest.fixture
def torch_threads():
    """Set torch's thread count for a test (a 2-core machine can still run 16 threads: the split is what differs)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 4, 16])
@pytest.mark.parametrize("dim", [8, 64, 128])
def test_block_attention_matmuls_do_not_depend_on_the_other_queries(dim, threads, torch_threads):
    """The two matmuls ``block_attention`` runs, shaped as it shapes them (query counts a multiple of QUERY_STEP,
    values ``value_width`` wide, key blocks through ``block_products``): one score and one block's weighted values
    are the same bits whatever the query count, the query's row, the key count and the batch entries, at each thread
    count (on an AMD EPYC, without the padding, a score among 4-11 queries and a head_dim-8 block product moved in the
    last bit; from 4 threads up, a lone block's product, one GEMM split over the threads, did too)."""
    torch_threads(threads)
    gen = torch.Generator().manual_seed(dim)
    key0, query0 = torch.randn(dim, generator=gen), torch.randn(dim, generator=gen)
    weights0, values0 = torch.rand(BLOCK, generator=gen), torch.randn(BLOCK, value_width(dim), generator=gen)
    scores, weighted = set(), set()
    for n in (QUERY_STEP, 2 * QUERY_STEP, 3 * QUERY_STEP, 9 * QUERY_STEP, 64 * QUERY_STEP):
        for keys, place in itertools.product((BLOCK, 10 * BLOCK), {0, 1, n // 2, n - 1}):
            batch = 1 + (n + keys + place) % 4
            k, q = torch.randn(batch, keys, dim, generator=gen), torch.randn(batch, n, dim, generator=gen)
            k[-1, keys // 2], q[-1, place] = key0, query0
            scores.add(torch.matmul(k, q.transpose(1, 2))[-1, keys // 2, place].item())
            for blocks in {1, batch}:  # a lone block too
                w = torch.rand(blocks, BLOCK, n, generator=gen)
                v = torch.randn(blocks, BLOCK, value_width(dim), generator=gen)
                w[-1, :, place], v[-1] = weights0, values0
                weighted.add(tuple(block_products(w, v)[-1, place].tolist()))
    assert len(scores) == 1 and len(weighted) == 1


def test_fixed_order_sum_ignores_the_other_rows():
    x = torch.randn(5, 100)
    alone = fixed_order_sum(x[2:3])
    assert torch.equal(fixed_order_sum(x)[2:3], alone)
    assert torch.allclose(alone, x[2:3].sum(-1), atol=1e-5)


def test_setting_flag_and_validation():
    import argparse

    from pydantic import ValidationError

    from rmserve.model.spec import ModelSpec
    from rmserve.serve.cli.flags import add_config_flags, overrides_from_args
    from rmserve.serve.config.loading import load_config

    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    config = load_config(environ={}, overrides=overrides_from_args(parser.parse_args(["--batch-invariant"])))
    assert config.model_spec().batch_invariant is True
    assert load_config(environ={}, overrides={}).model_spec().batch_invariant is False
    with pytest.raises(ValidationError, match="batch_invariant"):
        ModelSpec(batch_invariant=True, quantization="int8")
