"""Prefix sharing in the engine alone: GRPO and best-of-n batches with and without it, same engine, same run.

Workloads (random token ids, seeded):

* ``grpo``: groups of n = 8 samples, prompt P ∈ [768, 1024], responses R ∈ [192, 256], groups interleaved;
* ``bo16``: best-of-16, P ≈ 1,024, R ≈ 128;
* ``ppo``: no shared prompts (what sharing must not slow down).

Each workload runs four ways: ``off`` (the whole workload as one ``score_batch``, every item whole: the engine
without prefix sharing), ``batch`` (the same batch with sharing), ``stream-off`` and ``stream`` (items arrive in
batches of ``--stream-batch`` in interleaved order, one sample per request as OpenRLHF and verl send them; with
sharing, the prefix cache carries prompts across batches). Reported: seconds, tokens received, tokens computed,
their ratio, the speed-up of each sharing mode over its ``off`` twin, and the largest reward difference from
``off`` next to the rewards' standard deviation. With ``--steps N`` the stream modes run N training steps back to
back, each with groups of its own, and report the last one (what the engine learnt from the earlier steps counts:
a step with more groups than ``IDLE_ITEMS`` holds its first samples from the second step on); ``off`` and ``batch``
take that last step's items.

    python -m rmserve.benchmarks.prefix --config bench-20M --dtype fp32 --groups 4            # CPU
    python -m rmserve.benchmarks.prefix --config 8B-shape --dtype bf16 --groups 16 --max-batch-tokens 65536
    python -m rmserve.benchmarks.prefix --config bench-20M --dtype bf16 --groups 96 --workloads grpo --steps 3 \
        --cache-gb 2.4 --repeats 1                                                                  # many groups
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from .engine import synchronize
from .models import random_engine

SHAPES = {  # name: (group size, prompt range, response range)
    "grpo": (8, (768, 1024), (192, 256)),
    "bo16": (16, (960, 1088), (96, 160)),
    "ppo": (1, (256, 1024), (128, 512)),
}


def group_sequences(workload: str, groups: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Token sequences of ``groups`` groups, interleaved (sample k of every group, then sample k+1, ...)."""
    n, (p_lo, p_hi), (r_lo, r_hi) = SHAPES[workload]
    if workload == "ppo":
        groups *= 8  # as many items as a GRPO run, none sharing a prompt
    rng = random.Random(seed)
    members = []
    for _ in range(groups):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(p_lo, p_hi))]
        members.append([prompt + [rng.randrange(2, vocab) for _ in range(rng.randint(r_lo, r_hi))] for _ in range(n)])
    return [group[k] for k in range(n) for group in members]


MODES = ("off", "batch", "stream-off", "stream")


def run(engine, steps: list[list[list[int]]], mode: str, *, stream_batch: int, cache_bytes: int, device: str) -> dict:
    """One mode over ``steps`` (each a step's items); what is measured is the last step, after the others ran in
    the stream modes."""
    sharing = not mode.endswith("off")
    engine.configure_sharing(
        prefix_sharing=sharing, prefix_cache_bytes=cache_bytes if mode == "stream" else 0, reward_cache_items=0
    )
    if mode.startswith("stream"):
        for earlier in steps[:-1]:
            for k in range(0, len(earlier), stream_batch):
                engine.score_batch(earlier[k : k + stream_batch])
    seqs = steps[-1]
    before = engine.stats.real_tokens
    synchronize(device)
    started = time.perf_counter()
    if mode.startswith("stream"):
        rewards = []
        for k in range(0, len(seqs), stream_batch):
            rewards += engine.score_batch(seqs[k : k + stream_batch])
    else:
        rewards = engine.score_batch(seqs)
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "computed": engine.stats.real_tokens - before, "rewards": rewards}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench-20M")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--workloads", default="grpo,bo16,ppo")
    parser.add_argument("--stream-batch", type=int, default=16, help="items per batch in the 'stream' mode")
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--cache-gb", type=float, default=8.0, help="prefix cache budget in the 'stream' mode")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode; the fastest counts (noise only slows)")
    parser.add_argument("--steps", type=int, default=1, help="training steps of fresh groups; the last is measured")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    engine = random_engine(args.config, args.dtype, args.device, args.max_batch_tokens)
    overhead = engine.calibrate()
    vocab = engine.backbone.config.vocab_size
    engine.score_batch(group_sequences("grpo", 1, vocab, seed=99)[:4])  # warm-up
    print(f"{args.config} {args.dtype} on {_device_name(args.device)}; measured forward overhead {overhead:.0f} tokens")
    print(f"{'workload':<8} {'mode':<10} {'items':>6} {'seconds':>9} {'items/s':>9} {'computed/received':>18} "
          f"{'speed-up':>9} {'max |Δ|':>9} {'std(r)':>9}")  # fmt: skip
    results = {"config": args.config, "dtype": args.dtype, "device": _device_name(args.device),
               "overhead_tokens": overhead, "runs": []}  # fmt: skip
    for workload in args.workloads.split(","):
        steps = [group_sequences(workload, args.groups, vocab, seed=step) for step in range(max(1, args.steps))]
        seqs = steps[-1]
        received = sum(len(s) for s in seqs)
        measured: dict[str, dict] = {}
        for mode in MODES:
            runs = [run(engine, steps, mode, stream_batch=args.stream_batch, cache_bytes=int(args.cache_gb * 2**30),
                        device=args.device) for _ in range(max(1, args.repeats))]  # fmt: skip
            r = measured[mode] = min(runs, key=lambda x: x["seconds"])
            twin = measured["stream-off" if mode.startswith("stream") else "off"]
            reference = measured["off"]["rewards"]
            diff = max(abs(a - b) for a, b in zip(r["rewards"], reference, strict=True))
            row = {"workload": workload, "mode": mode, "items": len(seqs), "seconds": r["seconds"],
                   "received_tokens": received, "computed_tokens": r["computed"],
                   "speedup": twin["seconds"] / r["seconds"], "max_abs_diff": diff,
                   "reward_std": statistics.pstdev(reference)}  # fmt: skip
            results["runs"].append(row)
            print(f"{workload:<8} {mode:<10} {len(seqs):>6} {r['seconds']:>9.3f} {len(seqs) / r['seconds']:>9.1f} "
                  f"{r['computed'] / received:>18.3f} {row['speedup']:>8.2f}x {diff:>9.2e} "
                  f"{row['reward_std']:>9.3f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


def _device_name(device: str) -> str:
    return (
        torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
