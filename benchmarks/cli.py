"""``rmserve bench``: run the engine, padding and server benchmarks and write results.json, results.md, plots.

rmserve bench --quick                        # < 5 minutes on 2 CPU cores
rmserve bench --only engine,padding --out bench-results/
rmserve bench --only peers                   # against OpenRLHF's serve_rm.py (set up: benchmarks/README.md)
python -m rmserve.benchmarks.cli --quick     # the same, without the rmserve entry point
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

SECTIONS = ("engine", "padding", "server", "peers")
DEFAULT_SECTIONS = ("engine", "padding", "server")  # peers: on request (it needs OpenRLHF set up)


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    from .server import add_peer_args

    parser.add_argument("--quick", action="store_true", help="small runs: under 5 minutes on 2 CPU cores")
    parser.add_argument("--out", default="bench-results", help="output directory (default: bench-results/)")
    sections = "comma-separated subset of engine,padding,server,peers (default: all but peers)"
    parser.add_argument("--only", default=",".join(DEFAULT_SECTIONS), help=sections)
    parser.add_argument("--device", default="auto", help="engine device: auto (CUDA when present), cpu, cuda")
    parser.add_argument(
        "--engine-runs", default=None, help="config:precision list, e.g. demo:fp32,8B-shape:int8 (default: per device)"
    )
    parser.add_argument("--engine-items", type=int, default=None, help="PPO items per engine run")
    parser.add_argument("--server-model", default=None, help="serve this checkpoint directory instead of the CPU plan")
    parser.add_argument("--server-dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="servers' dtype")
    parser.add_argument("--repeats", type=int, default=None, help="server repeats per point (default: 1 quick, 2 full)")
    peers_dtype = "the peer comparison's dtype (serve_rm.py loads bf16 or fp16; default bf16, its own)"
    parser.add_argument("--peers-dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help=peers_dtype)
    add_peer_args(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


class Progress:
    """A tqdm bar that advances on every measured point and prints what was measured above itself."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="rmserve bench", unit="pt", disable=not enabled, file=sys.stderr)

    def __call__(self, message) -> None:
        self.bar.write(str(message))
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .engine import default_runs, run_engine_benchmarks
    from .launch import find_openrlhf_setup, rmserve_available
    from .machine import machine_info
    from .report import write_report
    from .scenarios import peer_plan
    from .server import count_points, peer_spec_sets, run_server_benchmarks, split

    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        print(f"rmserve bench: unknown section(s) {unknown}; choose from {list(SECTIONS)}", file=sys.stderr)
        return 2
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    runs = args.engine_runs.split(",") if args.engine_runs else default_runs(device)
    with_rmserve = "server" in only and rmserve_available()
    total = (len(runs) + 1 if "engine" in only else 0) + ("padding" in only)
    total += count_points(args.quick, with_rmserve, args.server_model) if "server" in only else 0
    peers = "peers" in only
    if peers:  # the peer's setup is looked for once, its notes go into the results
        setup, setup_note = find_openrlhf_setup(args.openrlhf_python, args.openrlhf_pythonpath)
        peer_options = dict(dtype=args.peers_dtype, with_rmserve=rmserve_available(), threads=split(args.threads),
                            inprocess=False if args.no_inprocess else None)  # fmt: skip
        sets, _ = peer_spec_sets(setup, quick=args.quick, attn=args.openrlhf_attn, **peer_options)
        total += count_points(args.quick, False, spec_sets=sets, plan=peer_plan(args.quick))
    out = Path(args.out)
    argv = sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]
    results: dict = {
        "command": "rmserve bench " + shlex.join(argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_info(),
        "notes": [],
    }
    started = time.perf_counter()
    progress = Progress(total, enabled=not args.no_progress)
    try:
        if "engine" in only:
            items = args.engine_items or (32 if args.quick else 128) * (8 if device.startswith("cuda") else 1)
            results["engine"] = run_engine_benchmarks(
                runs, device=device, n_items=items, repeats=2 if args.quick else 3, progress=progress
            )
        if "padding" in only:
            results["padding"] = run_padding(256 if args.quick else 1024)
            progress(f"padding: engine {results['padding']['engine']['padding_efficiency']:.3f}, "
                     f"first-come-first-served {results['padding']['fcfs']['padding_efficiency']:.3f}")  # fmt: skip
        if "server" in only:
            results["server"] = run_server_benchmarks(
                quick=args.quick,
                out_dir=out,
                dtype=args.server_dtype,
                repeats=args.repeats,
                progress=progress,
                with_rmserve=with_rmserve,
                model=args.server_model,
            )
        if peers:
            results["peers"] = run_server_benchmarks(
                quick=args.quick,
                out_dir=out,
                repeats=args.repeats,
                progress=progress,
                peers=True,
                openrlhf=setup,
                openrlhf_note=setup_note,
                openrlhf_attn=args.openrlhf_attn,
                say=progress.bar.write,
                **peer_options,
            )
    finally:
        progress.close()
    results["seconds"] = time.perf_counter() - started
    if device == "cpu":
        results["notes"].append("No GPU in this run: the 8B-shape engine rows and int8 need a CUDA machine.")
    for path in write_report(results, out):
        print(path)
    return 0


def run_padding(n_items: int, max_batch_tokens: int = 16384) -> dict:
    """Engine (sorted, planned) vs first-come-first-served micro-batches on the PPO mix (512+512, ≤ 4,096)."""
    from rmserve.model import load_reward_model

    from .padding import measure
    from .workloads import PPO_FULL, ppo_token_items

    rm = load_reward_model("demo", dtype="fp32", device="cpu")
    items = ppo_token_items(n_items, rm.formatter.vocab_size, seed=0, shape=PPO_FULL, bos_id=rm.formatter.bos_id)
    results = measure(rm.engine, [i["input_ids"] for i in items], max_batch_tokens)
    results["workload"] = {
        "items": n_items,
        "shape": "PPO 512+512 median, ≤ 4096",
        "max_batch_tokens": max_batch_tokens,
    }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rmserve bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_bench_args(parser)
    return cmd_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
