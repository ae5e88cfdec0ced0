"""The arithmetic the benchmarks report, checked against numbers worked out by hand; and the workload generators.

No Ray, no network, no timing: FLOP counts, padding efficiency, percentiles, speedups, and seeded, bounded workloads.
"""

from __future__ import annotations

import pytest

from rmserve.benchmarks.flops import (
    DecoderShape,
    flops_per_token,
    matmul_flops,
    model_flops,
    padded_flops,
    padding_efficiency,
    utilization,
)
from rmserve.benchmarks.loadgen import check_loopback, percentile
from rmserve.benchmarks.padding import fcfs_groups
from rmserve.benchmarks.server import speedups
from rmserve.benchmarks.workloads import (
    PPO_CPU,
    PPO_FULL,
    grpo_groups,
    pairwise_pairs,
    ppo_prompt_response_lengths,
    ppo_token_items,
    short_token_items,
)

# hidden 8, 2 layers, 2 heads of 4 (attention width 8), 1 KV head (width 4), intermediate 16.
TINY = DecoderShape(hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=16,
                    vocab_size=100)  # fmt: skip


def test_tiny_parameter_count_by_hand():
    # q 8·8=64, k 8·4=32, v 32, o 8·8=64 → 192; MLP 3·8·16=384; two norms 16 → 592 per layer
    assert TINY.layer_params() == 592
    # two layers + the final norm (8); no embedding table (100·8) and no head
    assert TINY.non_embedding_params() == 2 * 592 + 8 == 1192


def test_flops_per_token_by_hand():
    # 2·N = 2384; attention 4·L·seq·(n_heads·d_head) = 4·2·10·8 = 640
    assert flops_per_token(TINY, 10) == 2384 + 640 == 3024


def test_model_flops_count_each_item_over_its_own_length():
    # item of 10: 10·(2384 + 4·2·10·8) = 10·3024 = 30,240; item of 5: 5·(2384 + 320) = 13,520
    assert model_flops(TINY, [10, 5]) == 30_240 + 13_520


def test_padded_flops_count_every_position_at_the_padded_width():
    # the same two items padded into one 2 × 10 micro-batch: 2·10·3024
    assert padded_flops(TINY, rows=2, width=10) == 60_480
    assert padded_flops(TINY, 2, 10) > model_flops(TINY, [10, 5])


def test_bench_20m_and_llama3_8b_non_embedding_parameters():
    bench = DecoderShape(512, 6, 8, 8, 64, 1376, 32000)
    # per layer: attention 4·512² = 1,048,576; MLP 3·512·1376 = 2,113,536; norms 1024 → 3,163,136
    assert bench.non_embedding_params() == 6 * 3_163_136 + 512 == 18_979_328
    llama8b = DecoderShape(4096, 32, 32, 8, 128, 14336, 128256)
    # per layer: q,o 2·4096² + k,v 2·4096·1024 + MLP 3·4096·14336 + norms 8192 = 218,112,000
    assert llama8b.non_embedding_params() == 32 * 218_112_000 + 4096 == 6_979_588_096


def test_shape_from_a_transformers_config_matches_the_instantiated_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=50)  # fmt: skip
    model = transformers.AutoModel.from_config(config)
    counted = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    assert DecoderShape.from_config(config).non_embedding_params() == counted


def test_matmul_flops_and_utilization():
    assert matmul_flops(2, 3, 4) == 48  # 2·3·4 multiply-adds, two FLOPs each
    assert utilization(50e9, 1.0, 100e9) == 0.5
    assert utilization(1.0, 0.0, 100.0) == 0.0


def test_padding_efficiency_by_hand():
    # [3, 5] padded to 5 → 10 positions; [8] alone → 8: real 16 of 18 padded
    assert padding_efficiency([[3, 5], [8]]) == pytest.approx(16 / 18)
    assert padding_efficiency([[4, 4, 4]]) == 1.0
    assert padding_efficiency([]) == 1.0


def test_first_come_first_served_groups_and_their_efficiency():
    # budget 10: [2, 5] costs 2·5 = 10 (fits); adding 3 → 3·5 = 15 > 10, so 3 starts a group; [3, 1] → 6; 9 → alone
    groups = fcfs_groups([2, 5, 3, 1, 9], max_batch_tokens=10)
    assert groups == [[0, 1], [2, 3], [4]]
    lengths = [2, 5, 3, 1, 9]
    assert padding_efficiency([[lengths[i] for i in g] for g in groups]) == pytest.approx(20 / (10 + 6 + 9))


def test_percentile_interpolates_like_numpy():
    values = [10.0, 20.0, 30.0, 40.0]
    assert percentile(values, 50) == 25.0  # rank 1.5
    assert percentile(values, 0) == 10.0 and percentile(values, 100) == 40.0
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)


def test_load_generator_refuses_non_loopback_urls():
    check_loopback("http://127.0.0.1:8000")
    with pytest.raises(ValueError, match="loopback"):
        check_loopback("http://example.com:8000")


def test_speedups_pair_each_rmserve_variant_with_the_baseline():
    points = [
        {"model": "demo", "workload": "short-single", "concurrency": 64, "server": "baseline", "items_per_s": 100.0},
        {"model": "demo", "workload": "short-single", "concurrency": 64, "server": "rmserve", "items_per_s": 250.0},
        {"model": "demo", "workload": "short-single", "concurrency": 1, "server": "rmserve", "items_per_s": 9.0},
    ]
    (row,) = speedups(points)
    assert row["speedup"] == 2.5 and row["concurrency"] == 64


def test_ppo_lengths_are_seeded_and_bounded():
    a = ppo_prompt_response_lengths(500, PPO_FULL, seed=3)
    assert a == ppo_prompt_response_lengths(500, PPO_FULL, seed=3)
    assert a != ppo_prompt_response_lengths(500, PPO_FULL, seed=4)
    for prompt, response in a:
        assert prompt >= PPO_FULL.min_length and response >= 1
        assert prompt + response <= PPO_FULL.max_total
    totals = sorted(p + r for p, r in a)
    assert 700 < totals[len(totals) // 2] < 1500  # median near 512 + 512


def test_token_items_are_seeded_bounded_and_in_vocabulary():
    items = ppo_token_items(200, vocab_size=1000, seed=1, shape=PPO_CPU, bos_id=1)
    assert items == ppo_token_items(200, vocab_size=1000, seed=1, shape=PPO_CPU, bos_id=1)
    for item in items:
        ids = item["input_ids"]
        assert len(ids) <= PPO_CPU.max_total and ids[0] == 1
        assert all(0 <= t < 1000 for t in ids)
    short = short_token_items(100, vocab_size=50, seed=2)
    assert all(16 <= len(i["input_ids"]) <= 64 for i in short)


def test_text_groups_and_pairs_are_seeded_and_shaped():
    groups = grpo_groups(6, 4, seed=0, shape=PPO_CPU)
    assert len(groups) == 6 and all(len(g["responses"]) == 4 for g in groups)
    assert groups == grpo_groups(6, 4, seed=0, shape=PPO_CPU)
    for g in groups:
        assert all(len(g["prompt"].split()) + len(r.split()) <= PPO_CPU.max_total for r in g["responses"])
    pairs = pairwise_pairs(5, seed=0, shape=PPO_CPU)
    assert len(pairs) == 5 and all({"prompt", "response_a", "response_b"} == set(p) for p in pairs)
