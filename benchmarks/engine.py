"""The ``ScoringEngine`` alone: tokens/s, items/s, padding efficiency and MFU, per model config and dtype.

MFU = model FLOP/s (real tokens, ``rmserve.benchmarks.flops``) ÷ the peak matmul FLOP/s of the same device,
measured in the same run with a large ``torch.matmul`` of the same dtype. Runs are ``config:precision``:
``demo:fp32``, ``bench-20M:fp32``, ``bench-20M:bf16`` (CPU), ``8B-shape:bf16``, ``8B-shape:int8`` (GPU).

    python -m rmserve.benchmarks.engine --runs demo:fp32,bench-20M:fp32,bench-20M:bf16 --items 64
    python -m rmserve.benchmarks.engine --runs 8B-shape:bf16,8B-shape:int8 --items 512     # on a GPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .flops import DecoderShape, matmul_flops, model_flops, padded_flops, utilization
from .models import TORCH_DTYPES, decoder_shape, ensure_bench_checkpoint, random_engine, save_random_checkpoint
from .workloads import PPO_CPU, PPO_FULL, ppo_token_items, short_token_items

CPU_RUNS = ("demo:fp32", "bench-20M:fp32", "bench-20M:bf16")
GPU_RUNS = ("8B-shape:bf16", "8B-shape:int8")
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}


@dataclass
class EngineResult:
    """One engine run: a model config and precision on one workload."""

    config: str
    precision: str
    device: str
    workload: str
    items: int
    real_tokens: int
    padded_tokens: int
    microbatches: int
    seconds: float
    tokens_per_s: float
    items_per_s: float
    padding_efficiency: float
    model_gflop_per_s: float
    peak_gflop_per_s: float
    mfu: float
    padded_flop_utilization: float
    non_embedding_params: int
    weights_gb: float
    max_batch_tokens: int
    threads: int
    peak_dtype: str = ""
    peak_memory_gb: float = 0.0  # accelerator memory at the run's peak (weights included); 0 on CPU


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_matmul_peak(dtype: torch.dtype, device: str, size: int | None = None, seconds: float = 0.5) -> float:
    """Best sustained FLOP/s of ``(size × size) @ (size × size)`` in ``dtype`` on ``device`` (3 timed windows)."""
    size = size or MATMUL_SIZE["cuda" if device.startswith("cuda") else "cpu"]
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.matmul(a, b)
    synchronize(device)
    best = 0.0
    for _ in range(3):
        count, started = 0, time.perf_counter()
        while True:
            torch.matmul(a, b)
            count += 1
            synchronize(device)
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
        best = max(best, count * matmul_flops(size, size, size) / elapsed)
    return best


def weights_gb(module: torch.nn.Module) -> float:
    """Bytes of the parameters as stored (int8 weights count one byte each), in GB."""
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 1e9


def time_engine(engine, sequences: list[list[int]], device: str, repeats: int = 1) -> tuple[float, list, dict]:
    """Score ``repeats`` times after a short warm-up and keep the fastest (noise on a shared machine only slows
    a run down); returns its seconds, rewards and engine-stats delta."""
    engine.score_batch(sequences[: min(4, len(sequences))])  # warm-up: allocator, kernels, thread pool
    synchronize(device)
    best: tuple[float, list, dict] | None = None
    for _ in range(repeats):
        before = asdict(engine.stats)
        started = time.perf_counter()
        rewards = engine.score_batch(sequences)
        synchronize(device)
        seconds = time.perf_counter() - started
        after = asdict(engine.stats)
        delta = {k: after[k] - before[k] for k in ("real_tokens", "padded_tokens", "microbatches", "items")}
        if best is None or seconds < best[0]:
            best = (seconds, rewards, delta)
    assert best is not None
    return best


def summarize(
    config: str, precision: str, device: str, workload: str, engine, shape: DecoderShape,
    sequences: list[list[int]], seconds: float, delta: dict, peak: float,
) -> EngineResult:  # fmt: skip
    flops = model_flops(shape, (len(s) for s in sequences))
    padded = sum(_padded_microbatch_flops(shape, engine.stats.last_microbatch_sizes, sequences))
    return EngineResult(
        config=config, precision=precision, device=device, workload=workload, items=len(sequences),
        real_tokens=delta["real_tokens"], padded_tokens=delta["padded_tokens"], microbatches=delta["microbatches"],
        seconds=seconds, tokens_per_s=delta["real_tokens"] / seconds, items_per_s=len(sequences) / seconds,
        padding_efficiency=delta["real_tokens"] / max(1, delta["padded_tokens"]),
        model_gflop_per_s=flops / seconds / 1e9, peak_gflop_per_s=peak / 1e9, mfu=utilization(flops, seconds, peak),
        padded_flop_utilization=utilization(padded, seconds, peak), non_embedding_params=shape.non_embedding_params(),
        weights_gb=weights_gb(engine.backbone), max_batch_tokens=engine.max_batch_tokens,
        threads=torch.get_num_threads(),
    )  # fmt: skip


def _padded_microbatch_flops(shape: DecoderShape, sizes: list[int], sequences: list[list[int]]):
    """Padded FLOPs of the micro-batches the engine just ran (length-sorted, cut into runs of ``sizes``)."""
    lengths, start = sorted(len(s) for s in sequences), 0
    for rows in sizes:
        yield padded_flops(shape, rows, lengths[start + rows - 1])
        start += rows


def build_engine(config: str, precision: str, device: str, max_batch_tokens: int):
    """(engine, decoder shape) for a run: the demo and bench-20M through ``load_reward_model``; 8B-shape random."""
    from transformers import AutoConfig

    from rmserve.model import load_reward_model

    if config == "8B-shape" and precision != "int8":
        return random_engine(config, precision, device, max_batch_tokens), decoder_shape(config)
    scratch = None
    if config == "8B-shape":  # bitsandbytes quantises while loading: write a real bf16 checkpoint first (16 GB)
        scratch = Path(tempfile.mkdtemp(prefix="rmserve-8b-"))
        path = str(save_random_checkpoint(config, scratch, device=device, dtype="bf16"))
        torch.cuda.empty_cache()
    else:
        path = "demo" if config == "demo" else str(ensure_bench_checkpoint(config))
    quantization, dtype = "none", precision
    if precision == "int8":  # LLM.int8 weights, activations in bf16 on GPU (fp32 on CPU)
        quantization, dtype = "int8", "bf16" if device.startswith("cuda") else "fp32"
    try:
        rm = load_reward_model(
            path, dtype=dtype, quantization=quantization, device=device, max_batch_tokens=max_batch_tokens,
            reward_cache_items=0, prefix_cache_bytes=0,  # repeats of one workload must compute, not hit a cache
        )  # fmt: skip
        shape = DecoderShape.from_config(AutoConfig.from_pretrained(str(rm.path)))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return rm.engine, shape


def workload_sequences(config: str, device: str, n_items: int, seed: int, vocab_size: int) -> dict[str, list]:
    """The workloads a config runs: the PPO mix (scaled down on CPU), plus short items for the demo model."""
    shape = PPO_FULL if device.startswith("cuda") else PPO_CPU
    workloads = {"ppo": [i["input_ids"] for i in ppo_token_items(n_items, vocab_size, seed=seed, shape=shape)]}
    if config == "demo":
        workloads["short"] = [i["input_ids"] for i in short_token_items(4 * n_items, vocab_size, seed=seed)]
    return workloads


def run_engine_benchmarks(
    runs: list[str],
    *,
    device: str,
    n_items: int,
    seed: int = 0,
    max_batch_tokens: int = 16384,
    repeats: int = 3,
    progress=None,
) -> dict:
    """Every run on its workloads, the matmul peaks they are divided by, and the bf16-vs-fp32 reward agreement.

    The peak of a dtype is measured before and after every run of that dtype and the best is kept; MFU is
    computed at the end against it (on a shared machine a peak measured in a busy moment would inflate MFU).
    """
    peaks: dict[str, float] = {}
    results: list[EngineResult] = []
    rewards: dict[tuple[str, str, str], list] = {}

    def update_peak(dtype: str) -> None:
        peaks[dtype] = max(peaks.get(dtype, 0.0), measure_matmul_peak(TORCH_DTYPES[dtype], device))

    for run in runs:
        config, precision = run.split(":")
        matmul_dtype = ("bf16" if device.startswith("cuda") else "fp32") if precision == "int8" else precision
        update_peak(matmul_dtype)
        engine, shape = build_engine(config, precision, device, max_batch_tokens)
        for workload, sequences in workload_sequences(config, device, n_items, seed, shape.vocab_size).items():
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            seconds, outcome, delta = time_engine(engine, sequences, device, repeats)
            result = summarize(config, precision, device, workload, engine, shape, sequences, seconds, delta,
                               peaks[matmul_dtype])  # fmt: skip
            result.peak_dtype = matmul_dtype
            if device.startswith("cuda"):
                result.peak_memory_gb = torch.cuda.max_memory_allocated() / 1e9
            results.append(result)
            rewards[(config, precision, workload)] = outcome
            if progress is not None:
                progress(f"engine {run} {workload}: {result.tokens_per_s:,.0f} tok/s, {result.model_gflop_per_s:,.1f} "
                         f"GFLOP/s, peak memory {result.peak_memory_gb:.1f} GB")  # fmt: skip
        del engine
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        update_peak(matmul_dtype)
    for result in results:  # against the best peak seen for that dtype
        peak = peaks[result.peak_dtype]
        result.mfu *= result.peak_gflop_per_s * 1e9 / peak
        result.padded_flop_utilization *= result.peak_gflop_per_s * 1e9 / peak
        result.peak_gflop_per_s = peak / 1e9
    return {
        "matmul_peak_gflop_per_s": {k: v / 1e9 for k, v in peaks.items()},
        "matmul_size": MATMUL_SIZE["cuda" if device.startswith("cuda") else "cpu"],
        "repeats": repeats,
        "runs": [asdict(r) for r in results],
        "reward_agreement": reward_agreement(rewards),
    }


def reward_agreement(rewards: dict[tuple[str, str, str], list]) -> list[dict]:
    """For each config run in fp32 and another precision: max |Δreward| and its ratio to the fp32 rewards' std."""
    rows = []
    for (config, precision, workload), values in rewards.items():
        reference = rewards.get((config, "fp32", workload))
        if precision == "fp32" or reference is None:
            continue
        diffs = [abs(a - b) for a, b in zip(values, reference, strict=True)]
        spread = statistics.pstdev(reference) or 1.0
        rows.append({"config": config, "precision": precision, "workload": workload,
                     "max_abs_diff": max(diffs), "max_abs_diff_over_std": max(diffs) / spread})  # fmt: skip
    return rows


def default_runs(device: str) -> list[str]:
    return list(GPU_RUNS if device.startswith("cuda") else CPU_RUNS)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", default=None, help="comma-separated config:precision (default: per device)")
    parser.add_argument("--items", type=int, default=64, help="PPO items per run (the demo also runs 4x short items)")
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per workload; the fastest is kept")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    runs = args.runs.split(",") if args.runs else default_runs(args.device)
    results = run_engine_benchmarks(
        runs,
        device=args.device,
        n_items=args.items,
        max_batch_tokens=args.max_batch_tokens,
        repeats=args.repeats,
        progress=print,
    )
    for r in results["runs"]:
        print(f"{r['config']}:{r['precision']} {r['workload']} on {r['device']}: {r['tokens_per_s']:,.0f} tok/s, "
              f"MFU {r['mfu']:.1%} of {r['peak_gflop_per_s']:,.0f} GFLOP/s ({r['peak_dtype']} matmul), padding "
              f"efficiency {r['padding_efficiency']:.3f}, weights {r['weights_gb']:.1f} GB, peak memory "
              f"{r['peak_memory_gb']:.1f} GB")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
