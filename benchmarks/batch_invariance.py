"""Batch invariance on this machine: which ops vary with batch composition, how far the default mode's rewards move,
and what the batch-invariant mode (``model.batch_invariant``) costs.

Three parts (``--parts``):

* ``ops``: each op the forward runs, measured on the same row (or element) in batches of other compositions. For
  each, how many *distinct* results one row gets (1 = invariant) or the largest difference, for plain torch and for
  its replacement in ``rmserve.model.invariant``: the linear layers' matmul by row count, the reward head's
  matrix-vector product, RMSNorm's mean, elementwise SiLU, GELU, exp, sin and cos by tensor size, SDPA by padding side
  and amount and with a cached prompt, and the batched matmuls block attention relies on.
* ``rewards``: items scored alone, then in random batches (random neighbours, both padding sides, token budgets
  from one row per forward to everything in one, prefix cache warm): the largest reward difference, per model,
  dtype and mode (the default mode's is the number the invariant mode removes; the invariant mode's must be 0).
* ``throughput``: the engine alone, default vs invariant mode on the same checkpoint and plans (the per-forward
  overhead is measured once and given to both): PPO-like items (128 + 128 tokens median, up to 1,024; batches of
  32, nothing shared) and GRPO-like groups (8 responses of 96-128 tokens to a 384-512-token prompt, groups
  interleaved, batches of 16, prefix cache on). Modes alternate; the fastest of ``--repeats`` runs counts.

    python -m rmserve.benchmarks.batch_invariance                                  # everything (minutes on 2 cores)
    python -m rmserve.benchmarks.batch_invariance --parts ops
    python -m rmserve.benchmarks.batch_invariance --parts throughput --models bench-20M --dtypes bf16 --repeats 5
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F

from rmserve.model import load_reward_model
from rmserve.model.invariant import (
    MATMUL_ROWS,
    QUERY_STEP,
    fixed_elementwise,
    fixed_rows_linear,
    head_rewards,
    value_width,
)

from .machine import machine_info
from .models import resolve_model_dir
from .workloads import PPO_CPU, ppo_prompt_response_lengths

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROW_COUNTS = (1, 2, 3, 5, 8, 15, 16, 17, 33, 64, 100, 128, 129, 256, 300, 512, 1000, 2048)
LINEAR_SHAPES = ((64, 176), (176, 64), (512, 1376), (1376, 512), (4096, 4096))  # (in, out): demo, bench-20M, 8B


def _distinct(results: list[torch.Tensor]) -> int:
    kinds: list[torch.Tensor] = []
    for r in results:
        if not any(torch.equal(r, k) for k in kinds):
            kinds.append(r)
    return len(kinds)


def _row_in_batches(fn, row: torch.Tensor, counts, gen: torch.Generator) -> list[torch.Tensor]:
    """``fn`` of batches of ``count`` random rows with ``row`` at the first, middle and last place: its results."""
    out = []
    for count in counts:
        for place in {0, count // 2, count - 1}:
            batch = torch.randn((count, row.shape[-1]), generator=gen).to(row.dtype)
            batch[place] = row
            out.append(fn(batch)[place])
    return out


def measure_ops(dtypes: list[str]) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows: list[dict] = []

    def record(op: str, dtype: str, shape: str, plain, invariant, unit: str = "distinct results") -> None:
        rows.append({"op": op, "dtype": dtype, "shape": shape, "plain": plain, "invariant": invariant, "unit": unit})
        print(f"{op:<44} {dtype:<5} {shape:<24} plain {plain!s:>10}   invariant {invariant!s:>6}   ({unit})")

    for name in dtypes:
        dtype = DTYPES[name]
        for k, n in LINEAR_SHAPES:
            w = torch.randn((n, k), generator=gen).to(dtype)
            x = torch.randn((k,), generator=gen).to(dtype)
            counts = ROW_COUNTS if k < 4096 else ROW_COUNTS[:-3]
            plain = _row_in_batches(lambda b, w=w: F.linear(b, w), x, counts, gen)
            fixed = _row_in_batches(lambda b, w=w: fixed_rows_linear(b, w, None), x, counts, gen)
            record("linear x @ W.T, by rows in the call", name, f"{k}->{n}, 1-{counts[-1]} rows", _distinct(plain),
                   _distinct(fixed))  # fmt: skip
        # One row at every place of a MATMUL_ROWS call: what FixedRowsLinear relies on.
        w = torch.randn((1376, 512), generator=gen).to(dtype)
        x = torch.randn((512,), generator=gen).to(dtype)
        places = []
        for place in range(MATMUL_ROWS):
            batch = torch.randn((MATMUL_ROWS, 512), generator=gen).to(dtype)
            batch[place] = x
            places.append(F.linear(batch, w)[place])
        record(f"linear, row at each of {MATMUL_ROWS} places", name, "512->1376", _distinct(places), _distinct(places))
        # RMSNorm's mean over the hidden size, by how many tokens the tensor holds.
        for hidden in (64, 512, 4096):
            x = torch.randn((hidden,), generator=gen).to(dtype)
            norm = _row_in_batches(lambda b: b.float().pow(2).mean(-1, keepdim=True), x, ROW_COUNTS, gen)
            record("RMSNorm mean(x^2), by tokens", name, f"hidden {hidden}", _distinct(norm), _distinct(norm))
    # The reward head (fp32 always): Linear(hidden, 1) over the scored rows.
    for hidden in (64, 512, 4096):
        head = torch.nn.Linear(hidden, 1, bias=False)
        x = torch.randn((hidden,), generator=gen)
        with torch.no_grad():
            plain = _row_in_batches(lambda b, h=head: h(b), x, ROW_COUNTS[:10], gen)
            fixed = _row_in_batches(lambda b, h=head: head_rewards(h, b), x, ROW_COUNTS[:10], gen)
        record("reward head Linear(hidden, 1), by rows", "fp32", f"hidden {hidden}", _distinct(plain),
               _distinct(fixed))  # fmt: skip
    # Transcendental elementwise ops: the same element in tensors of other sizes (SIMD body vs scalar tail).
    big = torch.randn((300_000,), generator=gen) * 4
    for label, fn in (("silu", F.silu), ("gelu", F.gelu), ("exp", torch.exp), ("sin", torch.sin), ("cos", torch.cos)):
        for name in dtypes:
            x = big.to(DTYPES[name])
            whole, fixed_whole = fn(x), fixed_elementwise(fn, x)
            plain = fixed = 0
            for size in list(range(1, 300)) + [32_767, 65_537, 100_003]:
                plain += int((fn(x[:size]) != whole[:size]).sum())
                fixed += int((fixed_elementwise(fn, x[:size]) != fixed_whole[:size]).sum())
            record(f"{label} elementwise, by tensor size", name, "sizes 1-299, 32K-100K", plain, fixed,
                   "elements that differ")  # fmt: skip
    rows += measure_attention(dtypes, gen) + measure_block_matmuls(gen)
    return rows


def measure_attention(dtypes: list[str], gen: torch.Generator) -> list[dict]:
    """SDPA: one sequence's last query, alone vs padded (side, amount) and vs its suffix over a cached prompt."""
    out = []
    heads, dim, length = 8, 64, 150
    for name in dtypes:
        dtype = DTYPES[name]
        q, k, v = (torch.randn((1, heads, length, dim), generator=gen).to(dtype) for _ in range(3))
        alone = F.scaled_dot_product_attention(q, k, v, is_causal=True)[0, :, -1].float()
        worst = {"right": 0.0, "left": 0.0}
        for pad in (1, 7, 30, 100):
            for side in worst:
                width = length + pad
                qs, ks, vs = (torch.randn((2, heads, width, dim), generator=gen).to(dtype) for _ in range(3))
                where = slice(0, length) if side == "right" else slice(pad, width)
                qs[0, :, where], ks[0, :, where], vs[0, :, where] = q[0], k[0], v[0]
                valid = torch.ones((2, width), dtype=torch.bool)
                valid[0] = False
                valid[0, where] = True
                mask = torch.ones((width, width), dtype=torch.bool).tril()[None] & valid[:, None, :]
                mask |= torch.eye(width, dtype=torch.bool)[None]
                got = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask[:, None])
                last = length - 1 if side == "right" else width - 1
                worst[side] = max(worst[side], (got[0, :, last].float() - alone).abs().max().item())
        cached = 0.0
        for prompt in (20, 64, 100):
            mask = torch.ones((length - prompt, length), dtype=torch.bool).tril(diagonal=prompt)
            got = F.scaled_dot_product_attention(q[:, :, prompt:], k, v, attn_mask=mask)[0, :, -1].float()
            cached = max(cached, (got - alone).abs().max().item())
        for label, value in (("right", worst["right"]), ("left", worst["left"]), ("cached prompt", cached)):
            row = {"op": f"SDPA, {label} vs alone", "dtype": name, "shape": f"{heads}x{length}x{dim}",
                   "plain": value, "invariant": 0.0, "unit": "max |diff| of the output"}  # fmt: skip
            out.append(row)
            print(f"{row['op']:<44} {name:<5} {row['shape']:<24} plain {value:>10.2e}   invariant (block attention: "
                  "see rewards)")  # fmt: skip
    return out


def measure_block_matmuls(gen: torch.Generator) -> list[dict]:
    """The two matmuls of ``block_attention``, per head dimension: how many distinct results one score and one
    block's weighted values get across calls (1 = invariant)."""
    out = []
    for dim in (8, 64, 128):
        # Block attention's matmuls (fp32): one score (a key . a query) of ``keys @ queries.T`` and one block's
        # weighted values ``weights.T @ values`` over 64 keys, by how many queries, keys and batch entries share the
        # call and by the query's row in it; plain (any query count, values head_dim + 1 wide) and as
        # ``block_attention`` calls them (query counts a multiple of QUERY_STEP, values ``value_width`` wide).
        for label, counts, width in (
            ("plain: 1-2,000 queries", (1, 2, 3, 5, 9, 17, 64, 130, 2000), dim + 1),
            (f"invariant: x{QUERY_STEP}", (16, 32, 48, 64, 144, 2000), value_width(dim)),
        ):
            key0, query0 = torch.randn((1, dim), generator=gen), torch.randn((1, dim), generator=gen)
            weights0, values0 = torch.rand((64, 1), generator=gen), torch.randn((64, width), generator=gen)
            scores, weighted = [], []
            for n in counts:
                for keys, place in itertools.product((64, 640, 4096), {0, min(1, n - 1), n // 2, n - 1}):
                    batch = 1 + (n + keys) % 5
                    k = torch.randn((batch, keys, dim), generator=gen)
                    q = torch.randn((batch, n, dim), generator=gen)
                    k[-1, keys // 2], q[-1, place] = key0[0], query0[0]
                    scores.append(torch.matmul(k, q.transpose(1, 2))[-1, keys // 2, place])
                    w = torch.rand((batch, 64, n), generator=gen)
                    w[-1, :, place] = weights0[:, 0]
                    v = torch.randn((batch, 64, width), generator=gen)
                    v[-1] = values0
                    weighted.append(torch.matmul(w.transpose(1, 2), v)[-1, place])
            for op, results in (("scores keys @ queries.T", scores), ("weights.T @ values, 64 keys", weighted)):
                distinct = _distinct(results)
                row = {"op": f"attention {op} ({label})", "dtype": "fp32", "shape": f"head_dim {dim}",
                       "plain": distinct, "invariant": distinct, "unit": "distinct results"}  # fmt: skip
                out.append(row)
                print(f"{row['op']:<44} fp32  {row['shape']:<24} distinct {distinct:>6}")
    return out


# -- whole-model rewards and throughput ---------------------------------------------------------------------
def load_pair(model: str, dtype: str) -> dict[bool, object]:
    """The default and the invariant model on one checkpoint, with the same measured per-forward overhead."""
    path = str(resolve_model_dir(model))
    default = load_reward_model(path, dtype=dtype, device="cpu", reward_cache_items=0)
    overhead = default.engine.overhead_tokens
    invariant = load_reward_model(
        path, dtype=dtype, device="cpu", reward_cache_items=0, batch_invariant=True, forward_overhead_tokens=overhead
    )
    return {False: default, True: invariant}


def ppo_items(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [p + r for p, r in ppo_prompt_response_lengths(count, PPO_CPU, seed)]
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def grpo_items(groups: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    members = []
    for _ in range(groups):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(384, 512))]
        members.append([prompt + [rng.randrange(3, vocab) for _ in range(rng.randint(96, 128))] for _ in range(8)])
    return [group[k] for k in range(8) for group in members]


def reward_spread(rm, items: list[list[int]], trials: int, seed: int) -> dict:
    """Each item alone (no sharing, no caches), then in ``trials`` random batches: the largest difference."""
    engine = rm.engine
    engine.configure_sharing(prefix_sharing=False, prefix_cache_bytes=0, reward_cache_items=0)
    alone = [engine.score_batch([s])[0] for s in items]
    engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=1 << 30, reward_cache_items=0)
    rng = random.Random(seed)
    worst, moved = 0.0, set()
    vocab = engine.backbone.config.vocab_size
    for trial in range(trials):
        engine.padding_side = ("right", "left")[trial % 2]
        engine.max_batch_tokens = (256, 2048, 16384)[trial % 3]
        picked = rng.sample(range(len(items)), len(items) // 2)
        neighbours = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 600))] for _ in range(rng.randint(0, 8))]
        batch = [items[k] for k in picked] + neighbours
        order = list(range(len(batch)))
        rng.shuffle(order)
        got = engine.score_batch([batch[i] for i in order])
        for j, i in enumerate(order):
            if i < len(picked):
                diff = abs(got[j] - alone[picked[i]])
                worst = max(worst, diff)
                if diff:
                    moved.add(picked[i])
    engine.padding_side, engine.max_batch_tokens = "right", 16384
    spread = statistics.pstdev(alone)
    return {"max_abs_diff": worst, "items_moved": len(moved), "items": len(items), "reward_std": spread}


def measure_rewards(models: list[str], dtypes: list[str], items: int, trials: int) -> list[dict]:
    out = []
    for model in models:
        for dtype in dtypes:
            pair = load_pair(model, dtype)
            vocab = pair[False].engine.backbone.config.vocab_size
            seqs = ppo_items(items // 2, vocab, seed=1) + grpo_items(max(1, items // 16), vocab, seed=2)
            for invariant, rm in pair.items():
                r = {"model": model, "dtype": dtype, "mode": "invariant" if invariant else "default",
                     **reward_spread(rm, seqs, trials, seed=3)}  # fmt: skip
                out.append(r)
                print(f"{model:<10} {dtype:<5} {r['mode']:<10} max |reward diff| {r['max_abs_diff']:.3e} "
                      f"({r['items_moved']}/{r['items']} items moved; reward std {r['reward_std']:.3f})")  # fmt: skip
    return out


def run_stream(rm, seqs: list[list[int]], batch: int) -> float:
    rm.engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=1 << 30, reward_cache_items=0)
    started = time.perf_counter()
    for k in range(0, len(seqs), batch):
        rm.engine.score_batch(seqs[k : k + batch])
    return time.perf_counter() - started


def measure_throughput(models: list[str], dtypes: list[str], ppo: int, groups: int, repeats: int) -> list[dict]:
    out = []
    for model in models:
        for dtype in dtypes:
            pair = load_pair(model, dtype)
            vocab = pair[False].engine.backbone.config.vocab_size
            workloads = {"PPO": (ppo_items(ppo, vocab), 32), "GRPO-8": (grpo_items(groups, vocab), 16)}
            for workload, (seqs, batch) in workloads.items():
                for rm in pair.values():  # warm-up
                    run_stream(rm, seqs[: batch * 2], batch)
                best = {False: float("inf"), True: float("inf")}
                for _ in range(repeats):
                    for invariant, rm in pair.items():
                        best[invariant] = min(best[invariant], run_stream(rm, seqs, batch))
                r = {"model": model, "dtype": dtype, "workload": workload, "items": len(seqs),
                     "tokens": sum(map(len, seqs)), "default_items_per_s": len(seqs) / best[False],
                     "invariant_items_per_s": len(seqs) / best[True], "ratio": best[False] / best[True]}  # fmt: skip
                out.append(r)
                print(f"{model:<10} {dtype:<5} {workload:<7} {len(seqs):>4} items: default "
                      f"{r['default_items_per_s']:8.1f} items/s, invariant {r['invariant_items_per_s']:8.1f} items/s, "
                      f"invariant / default {r['ratio']:.2f}")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="ops,rewards,throughput")
    parser.add_argument("--models", default="demo,bench-20M")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--items", type=int, default=48, help="items of the rewards part (PPO-like and GRPO-like)")
    parser.add_argument("--trials", type=int, default=6, help="random batches per model in the rewards part")
    parser.add_argument("--ppo", type=int, default=128, help="PPO-like items of the throughput part")
    parser.add_argument("--groups", type=int, default=8, help="GRPO groups (of 8) of the throughput part")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    parts, models, dtypes = args.parts.split(","), args.models.split(","), args.dtypes.split(",")
    info = machine_info()
    print(f"{info['cpu']}; torch {info['torch']}, {info['torch_threads']} threads")
    results: dict = {"machine": info}
    if "ops" in parts:
        results["ops"] = measure_ops(dtypes)
    if "rewards" in parts:
        results["rewards"] = measure_rewards(models, dtypes, args.items, args.trials)
    if "throughput" in parts:
        results["throughput"] = measure_throughput(models, dtypes, args.ppo, args.groups, args.repeats)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
