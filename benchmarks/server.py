"""rmserve (Ray Serve) against the naive baseline, same model, dtype and machine, in the same run.

For each model both servers are started as subprocesses on free loopback ports and stay up together; every
(workload, concurrency) point is measured on each server in turn, ``repeats`` times with the order alternating,
and the median is reported (other work on a shared machine then hits both alike). The serving overhead is the
p50 latency of an idle single-item request minus the engine's own time for the same items in this process.

    python -m rmserve.benchmarks.server --quick
    python -m rmserve.benchmarks.server --model /scratch/rm-8b --dtype bf16     # on a GPU machine
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .launch import (
    RunningServer,
    baseline_command,
    free_port,
    rmserve_available,
    rmserve_command,
    running_server,
)
from .loadgen import LoadResult, Send, post_request, run_load
from .models import resolve_model_dir
from .scenarios import Scenario, build_requests, prefix_plan, scenario_plan

IDLE_REQUESTS = 64


@dataclass(frozen=True)
class ServerSpec:
    """One server of a comparison: how to start it, and which workloads it runs (None: all)."""

    name: str
    kind: str  # "baseline" (the naive server), "rmserve", or "ceiling" (the naive server without a model)
    env: dict = field(default_factory=dict)
    workloads: tuple[str, ...] | None = None
    args: tuple[str, ...] = ()  # extra `rmserve serve` flags

    def command(self, model_dir: str, port: int, dtype: str) -> list[str]:
        if self.kind == "rmserve":
            return rmserve_command(model_dir, port, dtype, list(self.args))
        return baseline_command(model_dir, port, dtype, ["--no-model"] if self.kind == "ceiling" else None)


def server_specs(model: str, with_rmserve: bool, quick: bool) -> list[ServerSpec]:
    """The servers compared for ``model``, each pair with the same number of torch threads.

    rmserve's Scorer runs torch on as many threads as its ``num_cpus`` (``--num-cpus``; ``auto`` by default, the
    machine's cores), so the comparison pins it to one thread and "baseline" gets the same one thread. (With
    torch's default of one thread per core, a naive server on a shared, oversubscribed machine spends most of its
    CPU spinning in OpenMP barriers.) The full run also compares both with two threads on bench-20M, and the demo
    model gets an HTTP ceiling: the naive server without a model, i.e. the most single-item requests/s this load
    generator can get through HTTP here, and rmserve behind Ray Serve's HTTP proxy (``--ingress proxy``, what
    ``serve run`` and KubeRay use) next to the direct ingress ``rmserve serve`` uses by default.
    """
    one_thread = {"OMP_NUM_THREADS": "1"}
    specs = [ServerSpec("baseline", "baseline", env=one_thread)]
    if model == "demo":
        specs.append(ServerSpec("http-ceiling", "ceiling", env=one_thread, workloads=("short-single",)))
    if with_rmserve:
        specs.append(ServerSpec("rmserve", "rmserve", args=("--num-cpus", "1")))
        if model == "demo" and not quick:
            proxy = ("--num-cpus", "1", "--ingress", "proxy")
            specs.append(ServerSpec("rmserve-proxy", "rmserve", workloads=("short-single",), args=proxy))
    if model == "bench-20M" and not quick:
        two_threads = {"OMP_NUM_THREADS": "2"}
        specs.append(ServerSpec("baseline-omp2", "baseline", env=two_threads))
        if with_rmserve:
            # 1.75 CPUs run torch on 2 threads and leave the Gateway its 0.25 on a 2-core machine.
            specs.append(ServerSpec("rmserve-omp2", "rmserve", env=two_threads, args=("--num-cpus", "1.75")))
    return specs


def prefix_specs() -> list[ServerSpec]:
    """The prefix-sharing comparison: each server at its own defaults (the naive server on torch's default threads,
    rmserve at ``num_cpus: auto``), rmserve with ``--prefix-sharing off``, and all three again at one torch thread."""
    one_thread = {"OMP_NUM_THREADS": "1"}
    return [
        ServerSpec("baseline", "baseline"),
        ServerSpec("rmserve", "rmserve"),
        ServerSpec("rmserve-noshare", "rmserve", args=("--prefix-sharing", "off")),
        ServerSpec("baseline-1t", "baseline", env=one_thread),
        ServerSpec("rmserve-1t", "rmserve", args=("--num-cpus", "1")),
        ServerSpec("rmserve-noshare-1t", "rmserve", args=("--num-cpus", "1", "--prefix-sharing", "off")),
    ]


def token_counters(url: str) -> tuple[float, float] | None:
    """(tokens computed by forwards, tokens received) from an rmserve ``/metrics``; None for other servers."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"{url}/metrics", timeout=10.0).text
    except httpx.HTTPError:
        return None
    values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    if "rmserve_input_tokens_total" not in values:
        return None
    return values.get("rmserve_forward_real_tokens_total", 0.0), values["rmserve_input_tokens_total"]


def run_point(url: str | list[str], requests, scenario: Scenario, server: str, concurrency: int,
              send: Send = post_request) -> LoadResult:  # fmt: skip
    return asyncio.run(
        run_load(url, requests, concurrency, server=server, workload=scenario.workload,
                 max_seconds=scenario.max_seconds, warmup=min(4, len(requests) // 8), send=send)
    )  # fmt: skip


def _cpu_since(before: os.times_result) -> float:
    now = os.times()
    return now.user + now.system - before.user - before.system


def median_point(points: list[LoadResult]) -> dict:
    """The repeat with the median throughput, plus every repeat's throughput."""
    ordered = sorted(points, key=lambda p: p.items_per_s)
    chosen = ordered[(len(ordered) - 1) // 2].to_dict()
    chosen["repeats_items_per_s"] = [p.items_per_s for p in points]
    return chosen


def engine_idle_ms(model_dir: Path, sequences: list[list[int]], dtype: str) -> dict:
    """The engine's own p50 time (ms) to score one of these items alone, with 1 and with all torch threads."""
    from rmserve.model import load_reward_model

    engine = load_reward_model(str(model_dir), dtype=dtype, device="cpu").engine
    threads = torch.get_num_threads()
    timings = {}
    try:
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            engine.score_batch([sequences[0]])
            samples = []
            for seq in sequences:
                started = time.perf_counter()
                engine.score_batch([seq])
                samples.append((time.perf_counter() - started) * 1000)
            timings[n] = statistics.median(samples)
    finally:
        torch.set_num_threads(threads)
    return {"engine_p50_ms_by_threads": timings, "engine_p50_ms": min(timings.values())}


def run_model(model: str, scenarios: list[Scenario], specs: list[ServerSpec], *, dtype: str, repeats: int,
              out_dir: Path, progress=None) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """Start every server for ``model``, measure its scenarios on each; returns (points, idle overhead rows)."""
    from transformers import AutoConfig

    model_dir = resolve_model_dir(model)
    vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    points: list[dict] = []
    with contextlib.ExitStack() as stack:
        started: dict[str, RunningServer] = {}
        for spec in specs:
            port = free_port()
            log = out_dir / "logs" / f"{spec.name}-{Path(model).name}.log"
            command = spec.command(str(model_dir), port, dtype)
            started[spec.name] = stack.enter_context(running_server(command, port, log_path=log, env=spec.env))
        for scenario in scenarios:
            running = [s for s in specs if s.workloads is None or scenario.workload in s.workloads]
            for level, concurrency in enumerate(scenario.concurrencies):
                runs: dict[str, list[LoadResult]] = {s.name: [] for s in running}
                for repeat in range(repeats):
                    # Fresh items for every repeat and concurrency (the same for every server): replayed items would
                    # be answered from rmserve's reward cache and flatter it.
                    requests = {s.name: build_requests(scenario.workload, s.kind, vocab_size=vocab,
                                                       n_requests=scenario.n_requests, ppo_shape=scenario.ppo_shape,
                                                       seed=1 + level * 1000 + repeat)
                                for s in running}  # fmt: skip
                    for spec in running if repeat % 2 == 0 else running[::-1]:
                        server, loadgen_cpu = started[spec.name], os.times()
                        cpu = server.cpu_seconds()
                        tokens = token_counters(server.url) if spec.kind == "rmserve" else None
                        point = run_point(server.url, requests[spec.name], scenario, spec.name, concurrency)
                        if tokens is not None and (after := token_counters(server.url)) is not None:
                            received = after[1] - tokens[1]
                            point.computed_over_received = (after[0] - tokens[0]) / received if received else None
                        point.server_cpu_ms_per_item = (server.cpu_seconds() - cpu) * 1000 / max(1, point.items_ok)
                        point.loadgen_cpu_ms_per_item = _cpu_since(loadgen_cpu) * 1000 / max(1, point.items_ok)
                        runs[spec.name].append(point)
                for name, measured in runs.items():
                    point = {"model": model, "dtype": dtype, **median_point(measured), "load_avg": os.getloadavg()}
                    points.append(point)
                    if progress:
                        ratio = point.get("computed_over_received")
                        share = f", computed/received {ratio:.3f}" if ratio is not None else ""
                        progress(f"server {model} {scenario.workload} C={concurrency} {name}: "
                                 f"{point['items_per_s']:.1f} items/s, p50 {point['p50_ms']:.1f} ms"
                                 f"{share}")  # fmt: skip
        served = {s.name: started[s.name].url for s in specs if s.kind != "ceiling"}
        overhead = idle_overhead(model, model_dir, served, dtype, vocab) if model == "demo" else []
    return points, overhead


def idle_overhead(model: str, model_dir: Path, urls: dict[str, str], dtype: str, vocab: int) -> list[dict]:
    """p50 of sequential single short-item requests on each server minus the engine's own p50 for them."""
    requests = build_requests("short-single", "rmserve", vocab_size=vocab, n_requests=IDLE_REQUESTS, seed=1)
    engine = engine_idle_ms(model_dir, [r.body["items"][0]["input_ids"] for r in requests], dtype)
    rows = []
    for server, url in urls.items():
        point = asyncio.run(run_load(url, requests, 1, server=server, workload="idle", warmup=4))
        rows.append({"model": model, "server": server, "http_p50_ms": point.p50_ms, **engine,
                     "overhead_ms": point.p50_ms - engine["engine_p50_ms"]})  # fmt: skip
    return rows


def run_server_benchmarks(
    *,
    quick: bool,
    out_dir: Path,
    dtype: str = "fp32",
    repeats: int | None = None,
    progress=None,
    with_rmserve: bool | None = None,
    model: str | None = None,
    prefix: bool = False,
) -> dict:
    """Every scenario of the plan on every server (the baseline alone when ``rmserve serve`` is not installed);
    ``model``: one checkpoint directory at the full PPO mix instead of the CPU plan; ``prefix``: the prefix-sharing
    comparison (``prefix_plan`` on ``prefix_specs``) instead."""
    with_rmserve = rmserve_available() if with_rmserve is None else with_rmserve
    notes = [] if with_rmserve else ["`rmserve serve` is not available in this installation: baseline only"]
    repeats = repeats or (1 if quick else 2)
    plan = prefix_plan(quick) if prefix else scenario_plan(quick, model)
    points: list[dict] = []
    overhead: list[dict] = []
    for name in dict.fromkeys(s.model for s in plan):
        specs = prefix_specs() if prefix else server_specs(name, with_rmserve, quick)
        scenarios = [s for s in plan if s.model == name]
        model_points, model_overhead = run_model(
            name, scenarios, specs, dtype=dtype, repeats=repeats, out_dir=out_dir, progress=progress
        )
        points += model_points
        overhead += model_overhead
    ratios = prefix_ratios(points) if prefix else speedups(points)
    return {"repeats": repeats, "points": points, "overhead": overhead, "speedups": ratios, "notes": notes}


def count_points(quick: bool, with_rmserve: bool, model: str | None = None) -> int:
    """How many (scenario, concurrency, server) points a run measures (for a progress bar)."""
    total = 0
    for scenario in scenario_plan(quick, model):
        specs = server_specs(scenario.model, with_rmserve, quick)
        running = [s for s in specs if s.workloads is None or scenario.workload in s.workloads]
        total += len(scenario.concurrencies) * len(running)
    return total


def speedups(points: list[dict]) -> list[dict]:
    """rmserve items/s ÷ baseline items/s (``rmserve-X`` ÷ ``baseline-X``) per (model, workload, concurrency)."""
    by_key = {(p["model"], p["workload"], p["concurrency"], p["server"]): p for p in points}
    rows = []
    for (model, workload, concurrency, server), p in by_key.items():
        base = by_key.get((model, workload, concurrency, server.replace("rmserve", "baseline", 1)))
        if server.startswith("rmserve") and base and base["items_per_s"] > 0:
            rows.append({"model": model, "workload": workload, "concurrency": concurrency, "server": server,
                         "rmserve_items_per_s": p["items_per_s"], "baseline_items_per_s": base["items_per_s"],
                         "speedup": p["items_per_s"] / base["items_per_s"]})  # fmt: skip
    return rows


def prefix_ratios(points: list[dict]) -> list[dict]:
    """Items/s of each rmserve variant over the baseline with the same threads, and sharing on over off."""
    by_key = {(p["model"], p["workload"], p["concurrency"], p["server"]): p for p in points}
    rows = []
    for (model, workload, concurrency, server), p in by_key.items():
        if not server.startswith("rmserve"):
            continue
        suffix = "-1t" if server.endswith("-1t") else ""
        against = [f"baseline{suffix}"] + ([f"rmserve-noshare{suffix}"] if "noshare" not in server else [])
        for other in against:
            base = by_key.get((model, workload, concurrency, other))
            if base and base["items_per_s"] > 0:
                rows.append({"model": model, "workload": workload, "concurrency": concurrency, "server": server,
                             "against": other, "speedup": p["items_per_s"] / base["items_per_s"],
                             "computed_over_received": p.get("computed_over_received")})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--model", default=None, help="a checkpoint directory instead of the CPU plan (GPU runs)")
    parser.add_argument("--prefix", action="store_true", help="the prefix-sharing comparison (GRPO, best-of-16, PPO)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_server_benchmarks(quick=args.quick, out_dir=out, dtype=args.dtype, repeats=args.repeats,
                                    progress=print, model=args.model, prefix=args.prefix)  # fmt: skip
    (out / ("server-prefix.json" if args.prefix else "server.json")).write_text(json.dumps(results, indent=2))
    for row in results["speedups"]:
        print(
            f"{row['workload']} C={row['concurrency']} {row['server']} vs {row.get('against', 'baseline')}: "
            f"{row['speedup']:.2f}x"
        )
    return results


if __name__ == "__main__":
    main()
