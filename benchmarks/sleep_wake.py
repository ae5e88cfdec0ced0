"""Sleep and wake on this machine: how long ``ScoringCore.sleep`` / ``wake_up`` take at each level, and the process's
resident memory awake, asleep and awake again.

The model is loaded as the server loads it (``load_scoring_core``: fp32, CPU; prefix sharing off, as a reward computed
on cached prefix keys/values may differ in its last bits from the whole item's and a sleep empties that cache) into
a ``ScoringCore`` in this process; each round scores a few items, sleeps, measures, wakes, scores again (the rewards
must equal the first ones bit for bit) and measures again. Resident memory is read from ``/proc/self/status``:
``VmRSS`` and its parts ``RssAnon`` (heap and anonymous mappings, where converted weights live) and ``RssFile`` (mapped
files: an fp32 safetensors checkpoint served in fp32 is mapped, not copied, and counts only once its pages are
touched).

Two checkpoints of the ``bench-20M`` shape (LLaMA 512 x 6, vocab 32,000: 35.4M parameters, 135 MiB in fp32): as
written in fp32 (mapped from the file) and written in bf16 (converted to fp32 on load, so in the heap).

On a GPU (``--device cuda``, a checkpoint of your own in the dtype it should be served in) the table adds the memory
torch holds on the device (``torch.cuda.memory_reserved``) awake, asleep and awake again.

Example::

    python -m rmserve.benchmarks.sleep_wake --rounds 3      # prints a markdown table
    python -m rmserve.benchmarks.models 8B-shape --out /scratch/rm-8b --dtype bf16
    python -m rmserve.benchmarks.sleep_wake --device cuda --dtype bf16 --checkpoint /scratch/rm-8b
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

ITEMS = [
    {"prompt": "What is the capital of France?", "response": "Paris, on the Seine."},
    {"prompt": "Name a prime number.", "response": "Seven is prime."},
    {"text": "A plain text item, scored whole."},
]


def resident_mib() -> dict[str, float]:
    """``VmRSS``, ``RssAnon`` and ``RssFile`` of this process, and what torch reserves on the GPU, in MiB."""
    import torch

    values = {"GPU": torch.cuda.memory_reserved() / 2**20 if torch.cuda.is_available() else 0.0}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) / 1024
    return values


def weights_mib(model) -> float:
    modules = (model.engine.backbone, model.engine.head)
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / 2**20


async def measure(
    path: Path, levels: tuple[int, ...], rounds: int, device: str = "cpu", dtype: str = "fp32"
) -> list[dict]:
    from rmserve.serve.config.loading import load_config
    from rmserve.serve.core.replica import load_scoring_core

    spec = {"path": str(path), "dtype": dtype, "device": device, "forward_overhead_tokens": 64, "prefix_sharing": "off"}
    core = load_scoring_core(load_config(base={"model": spec}), 0)
    model = core.model
    try:
        first = (await core.score_request(ITEMS)).rewards
        weights = weights_mib(model)
        rows = []
        for level in levels:
            sleeps, wakes, memory = [], [], []
            for _ in range(rounds):
                assert (await core.score_request(ITEMS)).rewards == first
                awake = resident_mib()
                started = time.perf_counter()
                await core.sleep(level)
                sleeps.append(time.perf_counter() - started)
                asleep = resident_mib()
                started = time.perf_counter()
                await core.wake_up()
                wakes.append(time.perf_counter() - started)
                rewards = (await core.score_request(ITEMS)).rewards
                assert rewards == first, f"rewards changed after a level-{level} wake: {rewards} != {first}"
                memory.append((awake, asleep, resident_mib()))
            rows.append(
                {
                    "level": level,
                    "weights_mib": weights,
                    "sleep_s": statistics.median(sleeps),
                    "wake_s": statistics.median(wakes),
                    "memory": memory[-1],
                }
            )
        return rows
    finally:
        core.close()


def bench_checkpoints(workdir: Path) -> dict[str, Path]:
    from rmserve.benchmarks.models import ensure_bench_checkpoint, save_random_checkpoint

    return {
        "bench-20M, stored fp32 (mapped)": ensure_bench_checkpoint("bench-20M"),
        "bench-20M, stored bf16 (converted)": save_random_checkpoint("bench-20M", workdir / "bf16", dtype="bf16"),
    }


def table(results: dict[str, list[dict]], gpu: bool = False) -> str:
    extra = " GPU reserved MiB |" if gpu else ""
    lines = [
        "| checkpoint | level | weights MiB | sleep s | wake s | RSS awake → asleep → awake MiB | RssAnon | RssFile |"
        + extra,
        "|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for name, rows in results.items():
        for row in rows:
            before, asleep, after = row["memory"]

            def trio(key: str, a=before, b=asleep, c=after) -> str:
                return f"{a[key]:.0f} → {b[key]:.0f} → {c[key]:.0f}"

            lines.append(
                f"| {name} | {row['level']} | {row['weights_mib']:.0f} | {row['sleep_s']:.3f} | {row['wake_s']:.3f} "
                f"| {trio('VmRSS')} | {trio('RssAnon')} | {trio('RssFile')} |" + (f" {trio('GPU')} |" if gpu else "")
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="sleep/wake rounds per level (the median is shown)")
    parser.add_argument("--checkpoint", default=None, help="measure this checkpoint directory only")
    parser.add_argument("--device", default="cpu", help="where the model is served (cpu, cuda)")
    parser.add_argument("--dtype", default="fp32", help="the dtype it is served in (fp32, bf16, fp16)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rmserve-sleep-") as tmp:
        checkpoints = {args.checkpoint: Path(args.checkpoint)} if args.checkpoint else bench_checkpoints(Path(tmp))
        results = {
            name: asyncio.run(measure(path, (1, 2), args.rounds, args.device, args.dtype))
            for name, path in checkpoints.items()
        }
    print(table(results, gpu=args.device.startswith("cuda")))


if __name__ == "__main__":
    main()
