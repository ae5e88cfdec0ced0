"""Padding efficiency of the engine's length-sorted token-budget micro-batches vs first-come-first-served.

Both policies score the same PPO-shaped items with the same model and the same ``max_batch_tokens``
in one run; efficiency = real tokens ÷ padded tokens actually computed (read from the engine's stats).

    python -m rmserve.benchmarks.padding --items 512 --max-batch-tokens 16384
"""

from __future__ import annotations

import argparse
import json
import time

from rmserve.benchmarks.workloads import ppo_lengths, random_token_ids


def fcfs_groups(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped in arrival order while rows × longest row fits the budget (no sorting)."""
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if current and (len(current) + 1) * max(longest, n) > max_batch_tokens:
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        groups.append(current)
    return groups


def measure(engine, seqs: list[list[int]], max_batch_tokens: int) -> dict:
    lengths = [len(s) for s in seqs]
    results = {}
    # rmserve: one call, the engine sorts and plans micro-batches.
    engine.max_batch_tokens = max_batch_tokens
    before = (engine.stats.real_tokens, engine.stats.padded_tokens)
    t = time.perf_counter()
    engine.score_batch(seqs)
    results["engine"] = _summary(engine, before, time.perf_counter() - t, len(seqs))
    # baseline: arrival-order groups, each run as one padded forward.
    before = (engine.stats.real_tokens, engine.stats.padded_tokens)
    t = time.perf_counter()
    for group in fcfs_groups(lengths, max_batch_tokens):
        engine.score_microbatch([seqs[i] for i in group])
    results["fcfs"] = _summary(engine, before, time.perf_counter() - t, len(seqs))
    return results


def _summary(engine, before, seconds, n_items) -> dict:
    real = engine.stats.real_tokens - before[0]
    padded = engine.stats.padded_tokens - before[1]
    return {"padding_efficiency": real / padded, "real_tokens": real, "padded_tokens": padded,
            "seconds": seconds, "tokens_per_s": real / seconds, "items": n_items}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--items", type=int, default=512)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    from rmserve.model import load_reward_model

    rm = load_reward_model(args.model, dtype="fp32")
    lengths = ppo_lengths(args.items, seed=args.seed)
    seqs = random_token_ids(lengths, rm.formatter.vocab_size, seed=args.seed, bos_id=rm.formatter.bos_id)
    results = measure(rm.engine, seqs, args.max_batch_tokens)
    print(f"PPO mix: {args.items} items, median {sorted(lengths)[len(lengths) // 2]} tokens, "
          f"range {min(lengths)}-{max(lengths)}, max_batch_tokens={args.max_batch_tokens}")  # fmt: skip
    print(f"{'policy':<8} {'padding eff.':>12} {'padded tokens':>14} {'tokens/s':>10}")
    for name, r in results.items():
        print(f"{name:<8} {r['padding_efficiency']:>12.3f} {r['padded_tokens']:>14} {r['tokens_per_s']:>10.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
