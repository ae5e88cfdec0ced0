"""rmserve (Ray Serve) against the naive baseline and OpenRLHF's ``serve_rm.py``, same model, dtype and machine,
in the same run.

For each model the servers are started as subprocesses on free loopback ports and stay up together; every
(workload, concurrency) point is measured on each server in turn, ``repeats`` times with the order alternating,
and the median is reported (other work on a shared machine then hits all alike), each repeat on fresh items
(rmserve has a reward cache). Each point records items/s, p50/p95/p99 latency and the server's CPU per item: the
CPU time of its whole process tree (Ray's processes included) read from ``/proc`` before and after the point. The
serving overhead is the p50 latency of an idle single-item request minus the engine's own time for the same items
in this process.

``--peers`` is the comparison with what RL users run today (``peer_plan``: 64 clients, one text sample per request;
PPO on a 1-layer model and on bench-20M, GRPO and best-of-16 samples on bench-20M; bf16, each server at its
defaults): OpenRLHF's ``serve_rm.py`` (when set up, see ``launch.OPENRLHF_SETUP_HINT``; ``POST /get_reward``),
rmserve on Ray and, when ``rmserve serve`` accepts ``--runtime inprocess``, rmserve in one process (what Ray costs),
both through their ``/get_reward`` drop-in route, and the naive baseline. Before measuring, every server scores the
same few samples (never measured afterwards) and the rewards are printed side by side with their largest difference.

``--model DIR`` (a GPU machine) replaces the CPU plan with one checkpoint; ``--runtime inprocess`` starts rmserve as
``rmserve serve --runtime inprocess`` (one process, no Ray: ``python -m rmserve.serve.cli.main`` where there is no
``rmserve`` script) and ``--plan`` picks the GPU scenarios (``model_plan``): ``ppo-grpo`` (the PPO mix at full size,
then GRPO-8 samples with rmserve's prefix sharing on and off) or ``ppo-300`` (≈ 300-token items at 64 and 128
clients); with a plan, the engine alone first scores the PPO points' items in this process (``engine_reference``)
and each rmserve point is also given as a share of the engine's items/s.

    python -m rmserve.benchmarks.server --quick
    python -m rmserve.benchmarks.server --model /scratch/rm-8b --dtype bf16     # on a GPU machine
    python -m rmserve.benchmarks.server --model /scratch/rm-8b --dtype bf16 --runtime inprocess --plan ppo-grpo
    python -m rmserve.benchmarks.server --peers --quick --openrlhf-python /tmp/orlhf-venv/bin/python \\
        --openrlhf-pythonpath /tmp/orlhf-stubs:/tmp/orlhf-src
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .launch import (
    OPENRLHF_DTYPES,
    OPENRLHF_READY,
    READY,
    OpenRLHFSetup,
    ReadyProbe,
    RunningServer,
    ServerStartError,
    baseline_command,
    find_openrlhf_setup,
    free_port,
    openrlhf_command,
    rmserve_available,
    rmserve_command,
    rmserve_supports_runtime,
    running_server,
)
from .loadgen import LoadResult, Send, post_request, run_load
from .models import resolve_model_dir
from .report import server_markdown
from .scenarios import (
    QUERY_WORKLOADS,
    QueryFormat,
    Scenario,
    build_requests,
    peer_plan,
    prefix_plan,
    query_request,
    query_samples,
    scenario_plan,
)
from .workloads import BEST_OF_16, GRPO_SHARED, PPO_FULL, PPOShape

IDLE_REQUESTS = 64
REWARD_CHECK_ITEMS = 8  # samples of each query workload every server scores before the measurements
REWARD_CHECK_SEED = 999_983  # no measured point uses it: these samples are never replayed into a reward cache
SHOWN_REWARDS = 4  # of them printed side by side
# Two servers' rewards for the same sample agree when |a - b| <= rtol * (|b| + std), b the reference's reward, std
# the spread of the reference's rewards over the check's samples. bf16 keeps 8 significant bits: OpenRLHF's reward is
# itself a bf16 number (0.25 apart at 32-64), and on bench-20M a bf16 forward (transformers' or rmserve's) is up to
# 1.1 % of the reward off the fp32 one, which rmserve matches exactly; two bf16 forwards in different orders (OpenRLHF
# keeps the head in bf16, rmserve in fp32) are then up to ≈ 2 % apart. fp32 forwards must match.
REWARD_RTOL = {"fp32": 1e-4, "bf16": 0.03, "fp16": 0.005}


@dataclass(frozen=True)
class ServerSpec:
    """One server of a comparison: how to start it, and which workloads it runs (None: all)."""

    name: str
    # "baseline" (the naive server), "rmserve", "ceiling" (the naive server without a model) or "openrlhf"
    # (OpenRLHF's serve_rm.py, run by ``python`` with ``env``'s PYTHONPATH)
    kind: str
    env: dict = field(default_factory=dict)
    workloads: tuple[str, ...] | None = None
    args: tuple[str, ...] = ()  # extra `rmserve serve` (or serve_rm.py) flags
    python: str = ""  # openrlhf: the peer's interpreter
    attn: str = "sdpa"  # openrlhf: --ds.attn_implementation (its default flash_attention_2 needs flash-attn)
    optional: bool = False  # a server that fails to start is left out of the run (with a note) instead of ending it

    def command(self, model_dir: str, port: int, dtype: str) -> list[str]:
        if self.kind == "rmserve":
            return rmserve_command(model_dir, port, dtype, list(self.args))
        if self.kind == "openrlhf":
            return openrlhf_command(self.python, model_dir, port, dtype, self.attn, list(self.args))
        return baseline_command(model_dir, port, dtype, ["--no-model"] if self.kind == "ceiling" else None)

    @property
    def probe(self) -> ReadyProbe:
        return OPENRLHF_READY if self.kind == "openrlhf" else READY


def server_specs(model: str, with_rmserve: bool, quick: bool) -> list[ServerSpec]:
    """The servers compared for ``model``, each pair with the same number of torch threads.

    rmserve's Scorer runs torch on as many threads as its ``num_cpus`` (``--num-cpus``; ``auto`` by default, the
    machine's cores), so the comparison pins it to one thread and "baseline" gets the same one thread. (With
    torch's default of one thread per core, a naive server on a shared, oversubscribed machine spends most of its
    CPU spinning in OpenMP barriers.) The full run also compares both with two threads on bench-20M, and the demo
    model gets an HTTP ceiling: the naive server without a model, i.e. the most single-item requests/s this load
    generator can get through HTTP here, and rmserve behind Ray Serve's HTTP proxy (``--ingress proxy``, what
    ``serve run`` and KubeRay use) next to the direct ingress ``rmserve serve`` uses by default; and rmserve's
    in-process runtime (``--runtime inprocess``: what Ray costs, idle overhead included).
    """
    one_thread = {"OMP_NUM_THREADS": "1"}
    specs = [ServerSpec("baseline", "baseline", env=one_thread)]
    if model == "demo":
        specs.append(ServerSpec("http-ceiling", "ceiling", env=one_thread, workloads=("short-single",)))
    if with_rmserve:
        specs.append(ServerSpec("rmserve", "rmserve", args=("--num-cpus", "1")))
        if model == "demo":
            inprocess = ("--num-cpus", "1", "--runtime", "inprocess")
            specs.append(ServerSpec("rmserve-inprocess", "rmserve", args=inprocess))
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


# -- the --model path (a GPU machine): --runtime, --plan ------------------------------------------------------------
RUNTIMES = ("ray", "inprocess")
MODEL_PLANS = ("default", "ppo-grpo", "ppo-300")
PPO_300 = PPOShape(prompt_median=150, response_median=150, sigma=0.4, min_length=8, max_total=1024)  # ≈ 300 tokens
NOSHARE_SUFFIX = "-noshare"
ENGINE_WORKLOADS = ("ppo-single",)  # the points whose items the engine alone also scores (with a --plan)
ENGINE_MAX_ITEMS = 1024  # of each point's items (a rate: more only takes longer)


def model_plan(model: str | None, plan: str = "default", quick: bool = False) -> list[Scenario]:
    """The scenarios of a ``--model`` run (``model`` None: the CPU plan); ``default``: ``scenario_plan``'s PPO mix. The
    GPU plans send one sample per request, as a trainer's workers do:

    * ``ppo-grpo``: the PPO mix at full size (512 + 512 median, ≤ 4,096 tokens) at 64 clients, then GRPO n = 8
      samples (P 768-1,024, R 192-256 tokens, groups interleaved) at 64 clients (rmserve's prefix sharing on / off);
    * ``ppo-300``: PPO items of ≈ 300 tokens (150 + 150 median) at 64 and 128 clients (a small model: items/s, p99).

    ``quick``: a 32nd of the requests (at least 16), 3-second points (CPU smoke runs of the GPU pass)."""
    if plan not in MODEL_PLANS:
        raise ValueError(f"unknown plan {plan!r}; one of {MODEL_PLANS}")
    if model is None or plan == "default":
        return scenario_plan(quick, model)

    def size(n_requests: int, seconds: float) -> tuple[int, float]:
        return (max(16, n_requests // 32), 3.0) if quick else (n_requests, seconds)

    if plan == "ppo-grpo":
        return [
            Scenario(model, "ppo-single", (64,), *size(192, 40.0), PPO_FULL),
            Scenario(model, "grpo-per-sample", (64,), *size(128, 40.0)),
        ]
    return [Scenario(model, "ppo-single", (64, 128), *size(6144, 10.0), PPO_300)]


def uses_model_specs(model: str | None, plan: str, runtime: str) -> bool:
    """Whether a run takes ``model_specs`` (a ``--model`` run with a GPU plan or another runtime) instead of
    ``server_specs`` (the CPU plan, and ``--model`` alone, unchanged)."""
    return model is not None and (plan != "default" or runtime != "ray")


def model_specs(runtime: str = "ray", *, prefix_compare: bool = False) -> list[ServerSpec]:
    """The servers of a ``--model`` run with a plan or ``--runtime``, each at its defaults (on a GPU the torch threads
    only feed it): rmserve on ``runtime`` (``rmserve``: Ray; ``rmserve-inprocess``: one process, no Ray); with
    ``prefix_compare`` the same rmserve with ``--prefix-sharing off`` and no prefix cache (``-noshare``, the GRPO
    workload only; left out with a note when it does not start, e.g. out of GPU memory); the naive baseline."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; one of {RUNTIMES}")
    name, args = ("rmserve", ()) if runtime == "ray" else (f"rmserve-{runtime}", ("--runtime", runtime))
    specs = [ServerSpec(name, "rmserve", args=args)]
    if prefix_compare:
        off = (*args, "--prefix-sharing", "off", "--prefix-cache-bytes", "0")
        specs.append(ServerSpec(name + NOSHARE_SUFFIX, "rmserve", workloads=("grpo-per-sample",), args=off,
                                optional=True))  # fmt: skip
    specs.append(ServerSpec("baseline", "baseline"))
    return specs


def engine_items(scenario: Scenario, level: int, vocab: int, max_items: int = ENGINE_MAX_ITEMS) -> list[list[int]]:
    """The token ids of what the servers score at ``scenario``'s concurrency level ``level`` in its first repeat
    (``run_model``'s seed), the warm-up requests left out, at most ``max_items``."""
    requests = build_requests(scenario.workload, "rmserve", vocab_size=vocab, n_requests=scenario.n_requests,
                              ppo_shape=scenario.ppo_shape, seed=1 + level * 1000)  # fmt: skip
    warmup = min(4, len(requests) // 8)  # run_point's
    return [item["input_ids"] for r in requests[warmup:] for item in r.body["items"]][:max_items]


def engine_reference(model: str, scenarios: list[Scenario], *, dtype: str, say=print) -> list[dict]:
    """The engine alone, in this process, on the items of each ``ENGINE_WORKLOADS`` point (``engine_items``), loaded
    as ``rmserve serve --model DIR --dtype DTYPE`` loads it (the server's ``ModelSpec``: device, batch budget, prefix
    sharing, caches), both caches emptied before each pass: all items in one ``score_batch``, then in batches of the
    point's concurrency in arrival order (what rmserve's queue can at best form). Freed before the servers start."""
    import gc

    from transformers import AutoConfig

    from rmserve.model import load_reward_model
    from rmserve.serve.config.settings import ServerConfig

    wanted = [(s, level, c) for s in scenarios if s.workload in ENGINE_WORKLOADS
              for level, c in enumerate(s.concurrencies)]  # fmt: skip
    if not wanted:
        return []
    model_dir = resolve_model_dir(model)
    vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    rm = load_reward_model(ServerConfig(model={"path": str(model_dir), "dtype": dtype}).model_spec(0))
    cuda = next(rm.engine.backbone.parameters()).device.type == "cuda"
    rows = []
    try:
        for scenario, level, concurrency in wanted:
            seqs = engine_items(scenario, level, vocab)
            rm.engine.score_batch(seqs[: min(8, len(seqs))])  # warm-up: allocator, kernels
            whole = time_passes(rm.engine, [seqs], cuda)
            batches = time_passes(
                rm.engine, [seqs[k : k + concurrency] for k in range(0, len(seqs), concurrency)], cuda
            )
            rows.append({"model": model, "workload": scenario.workload, "concurrency": concurrency,
                         "items": len(seqs), "tokens": sum(len(q) for q in seqs), "seconds": whole,
                         "items_per_s": len(seqs) / whole, "batches_seconds": batches,
                         "batches_items_per_s": len(seqs) / batches,
                         "device": torch.cuda.get_device_name() if cuda else "cpu"})  # fmt: skip
            say(engine_line(rows[-1]))
    finally:
        rm = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return rows


def time_passes(engine, batches: list[list[list[int]]], cuda: bool) -> float:
    """Seconds to score ``batches`` one after the other, the engine's prefix and reward caches emptied first."""
    engine.configure_sharing(prefix_sharing=engine.prefix_sharing, prefix_cache_bytes=engine.prefix_cache.max_bytes,
                             reward_cache_items=engine.reward_cache.max_items)  # fmt: skip
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in batches:
        engine.score_batch(batch)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def engine_line(row: dict) -> str:
    return (f"engine alone on the items of {row['workload']} C={row['concurrency']} ({row['items']} items, "
            f"{row['tokens']:,} tokens, the server's model settings, this process): {row['items_per_s']:.1f} "
            f"items/s in one score_batch, {row['batches_items_per_s']:.1f} items/s in batches of "
            f"{row['concurrency']}")  # fmt: skip


def model_ratios(points: list[dict], engine: list[dict]) -> list[dict]:
    """Items/s of each rmserve point against the baseline, against the same rmserve without prefix sharing
    (``-noshare``) and against the engine alone on the same items (``engine``: one ``score_batch``;
    ``engine-batches``: batches of the concurrency), per (model, workload, concurrency)."""
    by_key = {(p["model"], p["workload"], p["concurrency"], p["server"]): p for p in points}
    engines = {(e["model"], e["workload"], e["concurrency"]): e for e in engine}
    rows = []
    for (model, workload, concurrency, server), p in by_key.items():
        if not server.startswith("rmserve"):
            continue
        against: dict[str, float] = {}
        if (base := by_key.get((model, workload, concurrency, "baseline"))) is not None:
            against["baseline"] = base["items_per_s"]
        if not server.endswith(NOSHARE_SUFFIX):
            if (twin := by_key.get((model, workload, concurrency, server + NOSHARE_SUFFIX))) is not None:
                against[server + NOSHARE_SUFFIX] = twin["items_per_s"]
            if (ref := engines.get((model, workload, concurrency))) is not None:
                against["engine"], against["engine-batches"] = ref["items_per_s"], ref["batches_items_per_s"]
        for other, value in against.items():
            if value > 0:
                rows.append({"model": model, "workload": workload, "concurrency": concurrency, "server": server,
                             "against": other, "speedup": p["items_per_s"] / value,
                             "computed_over_received": p.get("computed_over_received")})  # fmt: skip
    return rows


ONE_THREAD_SUFFIX = "-1t"
PEER_THREADS = ("defaults", "one")


def peer_specs(openrlhf: OpenRLHFSetup | None, *, dtype: str, inprocess: bool, with_rmserve: bool = True,
               attn: str = "sdpa", baseline: bool = True,
               threads: str = "defaults") -> tuple[list[ServerSpec], list[str]]:  # fmt: skip
    """The comparison with OpenRLHF's ``serve_rm.py``: the peer (when set up and ``dtype`` is one it loads), rmserve
    on Ray, rmserve in one process (``--runtime inprocess``, when this ``rmserve serve`` has it), the naive baseline.
    ``threads``: "defaults", every server at its own (torch's one thread per core for the peer and the baseline,
    ``num_cpus: auto`` for rmserve), or "one", every server on one torch thread (``OMP_NUM_THREADS=1``,
    ``--num-cpus 1``; names end in ``-1t``): on a small, shared CPU torch's default threads spin in OpenMP barriers
    and the one-thread set shows the serving path without that. At defaults, the in-process runtime runs again with
    ``--compile off`` (``rmserve-inprocess-eager``). Returns (specs, notes on what was left out)."""
    if threads not in PEER_THREADS:
        raise ValueError(f"threads must be one of {PEER_THREADS}, not {threads!r}")
    one = threads == "one"
    suffix, env, cpus = (ONE_THREAD_SUFFIX, {"OMP_NUM_THREADS": "1"}, ("--num-cpus", "1")) if one else ("", {}, ())
    specs: list[ServerSpec] = []
    notes: list[str] = []
    if openrlhf is not None and dtype in OPENRLHF_DTYPES:
        specs.append(ServerSpec(f"openrlhf{suffix}", "openrlhf", env={**openrlhf.env(), **env},
                                python=openrlhf.python, attn=attn, optional=True))  # fmt: skip
    elif openrlhf is not None:
        notes.append(f"OpenRLHF serve_rm.py skipped: it loads bf16 or fp16 only, not {dtype} (pass --dtype bf16)")
    if with_rmserve:
        specs.append(ServerSpec(f"rmserve{suffix}", "rmserve", args=cpus))
        if inprocess:
            inproc = ("--runtime", "inprocess", *cpus)
            specs.append(ServerSpec(f"rmserve-inprocess{suffix}", "rmserve", args=inproc, optional=True))
            if not one:  # what compiling norms and MLPs (model.compile, on by default for wide CPU models) buys
                eager = (*inproc, "--compile", "off")
                specs.append(ServerSpec("rmserve-inprocess-eager", "rmserve", args=eager, optional=True))
        else:
            notes.append("rmserve-inprocess skipped: this `rmserve serve` has no `--runtime inprocess` yet")
    else:
        notes.append("`rmserve serve` is not available in this installation: rmserve skipped")
    if baseline:
        specs.append(ServerSpec(f"baseline{suffix}", "baseline", env=env))
    return specs, notes


def peer_spec_sets(openrlhf: OpenRLHFSetup | None, *, dtype: str, quick: bool, with_rmserve: bool,
                   inprocess: bool | None = None, attn: str = "sdpa",
                   threads: list[str] | None = None) -> tuple[list[list[ServerSpec]], list[str]]:  # fmt: skip
    """``peer_specs`` for each thread setting (default: "defaults" quick, "defaults" then "one" in full), run one set
    after the other; ``inprocess`` None: when this ``rmserve serve`` accepts ``--runtime inprocess``."""
    if inprocess is None:
        inprocess = with_rmserve and rmserve_supports_runtime("inprocess")
    sets, notes = [], []
    for setting in threads or (["defaults"] if quick else list(PEER_THREADS)):
        specs, set_notes = peer_specs(openrlhf, dtype=dtype, inprocess=inprocess, with_rmserve=with_rmserve,
                                      attn=attn, threads=setting)  # fmt: skip
        sets.append(specs)
        notes += [n for n in set_notes if n not in notes]
    return sets, notes


def variant_of(name: str) -> tuple[str, str]:
    """(server, thread suffix): ``rmserve-inprocess-1t`` → (``rmserve-inprocess``, ``-1t``)."""
    if name.endswith(ONE_THREAD_SUFFIX):
        return name[: -len(ONE_THREAD_SUFFIX)], ONE_THREAD_SUFFIX
    return name, ""


def select_specs(specs: list[ServerSpec], names: list[str] | None, *, strict: bool = True) -> list[ServerSpec]:
    """The specs named in ``names`` (all when None), in their own order; a name without its thread suffix names every
    variant (``rmserve``: ``rmserve`` and ``rmserve-1t``); a name that matches nothing is an error (``strict``; not
    when picking from one of several sets, checked against all of them first)."""
    if names is None:
        return specs
    known = {s.name for s in specs} | {variant_of(s.name)[0] for s in specs}
    unknown = sorted(set(names) - known)
    if unknown and strict:
        raise ValueError(f"unknown or skipped server(s) {unknown}; this run has {[s.name for s in specs]}")
    return [s for s in specs if s.name in names or variant_of(s.name)[0] in names]


def select_plan(plan: list[Scenario], models: list[str] | None, workloads: list[str] | None) -> list[Scenario]:
    """The scenarios of ``plan`` on ``models`` running ``workloads`` (each None: all)."""
    return [s for s in plan if (models is None or s.model in models) and (workloads is None or s.workload in workloads)]


def cpu_ms_per_item(cpu_seconds: float, point: LoadResult) -> float:
    """Server CPU over the items it scored in the point: the counted ones and the warm-up ones before them (the CPU
    window holds both); failed requests count no items."""
    return cpu_seconds * 1000 / max(1, point.items_ok + point.warmup_items)


def first_reward(body: dict) -> float:
    """The one reward of a one-sample answer: ``/get_reward`` and ``/v1/score`` both answer ``{"rewards": [r]}``."""
    return float(body["rewards"][0])


def relative_diff(value: float, reference: float, spread: float) -> float:
    """``|value - reference|`` over ``|reference| + spread`` (when that is 0: 0 if they are equal, else inf)."""
    scale = abs(reference) + spread
    if scale == 0:
        return 0.0 if value == reference else math.inf
    return abs(value - reference) / scale


def compare_rewards(rewards: dict[str, list[float]], reference: str, rtol: float) -> dict:
    """Each server's rewards against ``reference``'s for the same samples: the largest |Δ|, the largest |Δ| as a
    share of ``|reference reward| + std`` (std: the reference rewards' spread), and whether every sample is within
    ``rtol`` of that (see ``REWARD_RTOL``)."""
    ref = rewards[reference]
    spread = statistics.pstdev(ref) if len(ref) > 1 else 0.0
    rows = {}
    for server, values in rewards.items():
        if server == reference:
            continue
        pairs = list(zip(values, ref, strict=True))
        diff = max((abs(a - b) for a, b in pairs), default=0.0)
        relative = max((relative_diff(a, b, spread) for a, b in pairs), default=0.0)
        rows[server] = {"max_abs_diff": diff, "max_rel_diff": relative, "agree": relative <= rtol}
    return {"reference": reference, "reward_std": spread, "rtol": rtol, "servers": rows}


def check_samples(workload: str, n_items: int, seed: int = REWARD_CHECK_SEED) -> list[dict]:
    """The reward check's samples: ``n_items`` PPO samples, or two samples from each of ``n_items / 2`` groups (in
    their interleaved order: the second of a group comes after the first, as in the measured runs)."""
    per_group = {"grpo-query": GRPO_SHARED.n, "best-of-16-query": BEST_OF_16.n}.get(workload, 0)
    if not per_group:
        return query_samples(workload, n_items, seed=seed)[:n_items]
    return query_samples(workload, max(1, n_items // 2) * per_group, seed=seed)[:n_items]


def reward_check(servers: dict[str, tuple[str, str]], workload: str, fmt: QueryFormat, *, tokenizer, model: str,
                 dtype: str, n_items: int = REWARD_CHECK_ITEMS) -> dict:  # fmt: skip
    """Every server scores the same ``n_items`` samples of ``workload`` (``check_samples``), one request each, in its
    own protocol, before any measurement; ``servers``: name → (kind, url). Their rewards side by side and how far
    apart, against OpenRLHF's when it runs."""
    import httpx

    texts = [fmt.query(s) for s in check_samples(workload, n_items)]
    rewards: dict[str, list[float]] = {}
    for name, (kind, url) in servers.items():
        with httpx.Client(base_url=url, timeout=300.0) as client:
            rewards[name] = []
            for text in texts:
                request = query_request(text, kind, fmt)
                response = client.post(request.path, json=request.body)
                response.raise_for_status()
                rewards[name].append(first_reward(response.json()))
    peers = [name for name in rewards if variant_of(name)[0] == "openrlhf"]
    reference = peers[0] if peers else next(iter(rewards))
    tokens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return {"model": model, "workload": workload, "dtype": dtype, "tokens": tokens, "rewards": rewards,
            **compare_rewards(rewards, reference, REWARD_RTOL.get(dtype, REWARD_RTOL["bf16"]))}  # fmt: skip


def reward_lines(check: dict, shown: int = SHOWN_REWARDS) -> list[str]:
    """The check's first ``shown`` samples with every server's reward, then each server's largest |Δ|."""
    names = list(check["rewards"])
    width = max(12, *(len(n) + 2 for n in names))
    lines = [f"rewards side by side, {check['model']} {check['dtype']} {check['workload']} "
             f"({len(check['tokens'])} samples, first {min(shown, len(check['tokens']))} shown):",
             "  tokens " + "".join(f"{n:>{width}}" for n in names)]  # fmt: skip
    for k in range(min(shown, len(check["tokens"]))):
        lines.append(f"  {check['tokens'][k]:>6} " + "".join(f"{check['rewards'][n][k]:>{width}.5f}" for n in names))
    for name, row in check["servers"].items():
        verdict = "agree" if row["agree"] else "DISAGREE"
        lines.append(f"  {name} vs {check['reference']}: max |Δ| {row['max_abs_diff']:.4g}, at most "
                     f"{row['max_rel_diff']:.2%} of |reward| + std ({check['reward_std']:.3g}) -> {verdict} "
                     f"(tolerance {check['rtol']:.2%}, {check['dtype']})")  # fmt: skip
    return lines


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
              out_dir: Path, progress=None, say=print) -> dict:  # fmt: skip
    """Start every server for ``model``, check their rewards agree on the query workloads, measure each scenario on
    each; returns {"points", "overhead" (idle rows), "reward_checks", "notes"}. ``progress`` is called once per
    measured point, ``say`` for everything else (the reward tables)."""
    from transformers import AutoConfig, AutoTokenizer

    model_dir = resolve_model_dir(model)
    vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    queries = [s.workload for s in scenarios if s.workload in QUERY_WORKLOADS]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir)) if queries else None
    fmt = QueryFormat.from_tokenizer(tokenizer) if tokenizer is not None else None
    points: list[dict] = []
    checks: list[dict] = []
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        started: dict[str, RunningServer] = {}
        for spec in specs:
            port = free_port()
            log = out_dir / "logs" / f"{spec.name}-{Path(model).name}.log"
            command = spec.command(str(model_dir), port, dtype)
            try:
                started[spec.name] = stack.enter_context(
                    running_server(command, port, log_path=log, env=spec.env, probe=spec.probe)
                )
            except ServerStartError as exc:
                if not spec.optional:
                    raise
                notes.append(f"{spec.name} did not start on {model} and was left out (log: {log}): "
                             f"{str(exc).splitlines()[0]}")  # fmt: skip
                say(notes[-1])
        specs = [s for s in specs if s.name in started]
        for workload in dict.fromkeys(queries):  # also every server's warm-up, on samples never measured
            served = {s.name: (s.kind, started[s.name].url) for s in specs if s.kind != "ceiling"}
            checks.append(reward_check(served, workload, fmt, tokenizer=tokenizer, model=model, dtype=dtype))
            for line in reward_lines(checks[-1]):
                say(line)
        for scenario in scenarios:
            running = [s for s in specs if s.workloads is None or scenario.workload in s.workloads]
            for level, concurrency in enumerate(scenario.concurrencies):
                runs: dict[str, list[LoadResult]] = {s.name: [] for s in running}
                for repeat in range(repeats):
                    # Fresh items for every repeat and concurrency (the same for every server): replayed items would
                    # be answered from rmserve's reward cache and flatter it.
                    requests = {s.name: build_requests(scenario.workload, s.kind, vocab_size=vocab,
                                                       n_requests=scenario.n_requests, ppo_shape=scenario.ppo_shape,
                                                       seed=1 + level * 1000 + repeat, fmt=fmt)
                                for s in running}  # fmt: skip
                    for spec in running if repeat % 2 == 0 else running[::-1]:
                        server, loadgen_cpu = started[spec.name], os.times()
                        cpu = server.cpu_seconds()
                        tokens = token_counters(server.url) if spec.kind == "rmserve" else None
                        point = run_point(server.url, requests[spec.name], scenario, spec.name, concurrency)
                        point.server_cpu_ms_per_item = cpu_ms_per_item(server.cpu_seconds() - cpu, point)
                        point.loadgen_cpu_ms_per_item = _cpu_since(loadgen_cpu) * 1000 / max(1, point.items_ok)
                        if tokens is not None and (after := token_counters(server.url)) is not None:
                            received = after[1] - tokens[1]
                            point.computed_over_received = (after[0] - tokens[0]) / received if received else None
                        runs[spec.name].append(point)
                for name, measured in runs.items():
                    point = {"model": model, "dtype": dtype, **median_point(measured), "load_avg": os.getloadavg()}
                    points.append(point)
                    if progress:
                        ratio = point.get("computed_over_received")
                        share = f", computed/received {ratio:.3f}" if ratio is not None else ""
                        failed = f", {point['requests_failed']} failed" if point["requests_failed"] else ""
                        progress(f"server {model} {scenario.workload} C={concurrency} {name}: "
                                 f"{point['items_per_s']:.1f} items/s, p50 {point['p50_ms']:.1f} ms, "
                                 f"p99 {point['p99_ms']:.1f} ms, server CPU "
                                 f"{point['server_cpu_ms_per_item']:.2f} ms/item{share}{failed}")  # fmt: skip
        served_urls = {s.name: started[s.name].url for s in specs if s.kind in ("rmserve", "baseline")}
        overhead = idle_overhead(model, model_dir, served_urls, dtype, vocab) if model == "demo" else []
    return {"points": points, "overhead": overhead, "reward_checks": checks, "notes": notes}


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
    peers: bool = False,
    openrlhf: OpenRLHFSetup | None = None,
    openrlhf_note: str | None = None,
    openrlhf_attn: str = "sdpa",
    inprocess: bool | None = None,
    servers: list[str] | None = None,
    models: list[str] | None = None,
    workloads: list[str] | None = None,
    threads: list[str] | None = None,
    runtime: str = "ray",
    plan_name: str = "default",
    say=print,
) -> dict:
    """Every scenario of the plan on every server (the baseline alone when ``rmserve serve`` is not installed);
    ``model``: one checkpoint directory at the full PPO mix instead of the CPU plan; ``prefix``: the prefix-sharing
    comparison (``prefix_plan`` on ``prefix_specs``) instead; ``peers``: the comparison with OpenRLHF's
    ``serve_rm.py`` (``peer_plan`` on ``peer_specs``; ``openrlhf`` from ``launch.find_openrlhf_setup``, None: the
    peer is skipped, ``openrlhf_note`` says why; ``threads``: ``peer_specs``'s settings, one set of servers after
    the other; default: "defaults" quick, both in full). ``servers``, ``models``, ``workloads``: only these.
    ``runtime``, ``plan_name`` (with ``model`` only): rmserve's runtime and ``model_plan``'s plan; either one other
    than the default runs ``model_specs`` (with a plan, ``engine_reference`` first)."""
    own_specs = not peers and not prefix and uses_model_specs(model, plan_name, runtime)
    if (runtime != "ray" or plan_name != "default") and not own_specs:
        raise ValueError("--runtime and --plan go with --model (not --peers or --prefix)")
    with_rmserve = rmserve_available() if with_rmserve is None else with_rmserve
    if own_specs and runtime != "ray" and not rmserve_supports_runtime(runtime):
        raise ValueError(f"this `rmserve serve` does not run --runtime {runtime} (or does not run at all)")
    notes = [] if with_rmserve or peers else ["`rmserve serve` is not available in this installation: baseline only"]
    repeats = repeats or (1 if quick else 2)
    peer_sets: list[list[ServerSpec]] = []  # one set of servers up at a time: each set interleaved within itself
    if peers:
        plan = peer_plan(quick)
        peer_sets, set_notes = peer_spec_sets(openrlhf, dtype=dtype, quick=quick, with_rmserve=with_rmserve,
                                              inprocess=inprocess, attn=openrlhf_attn, threads=threads)  # fmt: skip
        notes = ([openrlhf_note] if openrlhf_note else []) + set_notes
    else:
        plan = prefix_plan(quick) if prefix else model_plan(model, plan_name, quick)
    plan = select_plan(plan, models, workloads)
    for note in notes:
        say(note)
    results: dict = {"repeats": repeats, "dtype": dtype, "points": [], "overhead": [], "reward_checks": []}
    engine_rows: list[dict] = []
    for name in dict.fromkeys(s.model for s in plan):
        scenarios = [s for s in plan if s.model == name]
        if own_specs:
            grpo = any(s.workload == "grpo-per-sample" for s in scenarios)
            own = [model_specs(runtime, prefix_compare=grpo)]
            if plan_name != "default":
                rows = engine_reference(name, scenarios, dtype=dtype, say=say)
                engine_rows += rows
                notes += [engine_line(row) for row in rows]
        else:
            own = [prefix_specs() if prefix else server_specs(name, with_rmserve, quick)]  # pure: cheap
        spec_sets = peer_sets if peers else own
        select_specs([s for specs in spec_sets for s in specs], servers)  # a name no set has is an error
        for specs in spec_sets:
            run = run_model(name, scenarios, select_specs(specs, servers, strict=False), dtype=dtype, repeats=repeats,
                            out_dir=out_dir, progress=progress, say=say)  # fmt: skip
            for key in ("points", "overhead", "reward_checks"):
                results[key] += run[key]
            notes += run["notes"]
    points = results["points"]
    if own_specs:
        results.update(runtime=runtime, plan=plan_name, engine=engine_rows)
        results["speedups"] = model_ratios(points, engine_rows)
    else:
        results["speedups"] = peer_ratios(points) if peers else prefix_ratios(points) if prefix else speedups(points)
    results["notes"] = notes
    if peers and openrlhf is not None:
        results["openrlhf"] = {"python": openrlhf.python, "pythonpath": openrlhf.pythonpath,
                               "attn_implementation": openrlhf_attn, **openrlhf.versions}  # fmt: skip
    return results


def count_points(quick: bool, with_rmserve: bool, model: str | None = None,
                 spec_sets: list[list[ServerSpec]] | None = None,
                 plan: list[Scenario] | None = None) -> int:  # fmt: skip
    """How many (scenario, concurrency, server) points a run measures (for a progress bar); ``spec_sets``: the same
    sets of servers for every model (the peer comparison, with its ``plan``), else ``server_specs``'s."""
    total = 0
    for scenario in scenario_plan(quick, model) if plan is None else plan:
        sets = [server_specs(scenario.model, with_rmserve, quick)] if spec_sets is None else spec_sets
        running = [s for specs in sets for s in specs if s.workloads is None or scenario.workload in s.workloads]
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


def peer_ratios(points: list[dict]) -> list[dict]:
    """Each server against OpenRLHF's ``serve_rm.py`` with the same threads (items/s ratio, and its server CPU per
    item over the peer's), rmserve in one process against rmserve on Ray and against itself with ``--compile off``,
    per (model, workload, concurrency)."""
    by_key = {(p["model"], p["workload"], p["concurrency"], p["server"]): p for p in points}
    rows = []
    for (model, workload, concurrency, server), p in by_key.items():
        base_name, suffix = variant_of(server)
        against = [] if base_name == "openrlhf" else ["openrlhf" + suffix]
        against += ["rmserve" + suffix] if base_name == "rmserve-inprocess" else []
        against += ["rmserve-inprocess-eager"] if server == "rmserve-inprocess" else []  # what model.compile buys
        for other in against:
            base = by_key.get((model, workload, concurrency, other))
            if not base or base["items_per_s"] <= 0:
                continue
            mine, theirs = p.get("server_cpu_ms_per_item"), base.get("server_cpu_ms_per_item")
            rows.append({"model": model, "workload": workload, "concurrency": concurrency, "server": server,
                         "against": other, "speedup": p["items_per_s"] / base["items_per_s"],
                         "cpu_per_item_ratio": mine / theirs if mine is not None and theirs else None})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    dtypes = ["fp32", "bf16", "fp16"]
    parser.add_argument(
        "--dtype", default=None, choices=dtypes, help="default: bf16 with --peers (serve_rm.py's), else fp32"
    )
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--model", default=None, help="a checkpoint directory instead of the CPU plan (GPU runs)")
    parser.add_argument("--runtime", default="ray", choices=RUNTIMES,
                        help="with --model: rmserve's runtime (inprocess: one process, no Ray)")  # fmt: skip
    parser.add_argument("--plan", default="default", choices=MODEL_PLANS,
                        help="with --model: the scenarios (model_plan; a plan times the engine alone too)")  # fmt: skip
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--prefix", action="store_true", help="the prefix-sharing comparison (GRPO, best-of-16, PPO)")
    which.add_argument("--peers", action="store_true", help="the comparison with OpenRLHF's serve_rm.py (see above)")
    add_peer_args(parser)
    add_filter_args(parser)
    args = parser.parse_args(argv)
    if (args.runtime != "ray" or args.plan != "default") and (not args.model or args.peers or args.prefix):
        parser.error("--runtime and --plan go with --model (and neither --peers nor --prefix)")
    if args.model:  # a timeout's SIGTERM unwinds the runs, which stop their servers (sessions of their own)
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    dtype = args.dtype or ("bf16" if args.peers else "fp32")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup, note = find_openrlhf_setup(args.openrlhf_python, args.openrlhf_pythonpath) if args.peers else (None, None)
    results = run_server_benchmarks(quick=args.quick, out_dir=out, dtype=dtype, repeats=args.repeats,
                                    progress=print, model=args.model, prefix=args.prefix, peers=args.peers,
                                    openrlhf=setup, openrlhf_note=note, openrlhf_attn=args.openrlhf_attn,
                                    inprocess=False if args.no_inprocess else None, servers=split(args.servers),
                                    models=split(args.models), workloads=split(args.workloads),
                                    threads=split(args.threads), runtime=args.runtime,
                                    plan_name=args.plan)  # fmt: skip
    name = "server-peers" if args.peers else "server-prefix" if args.prefix else "server"
    name += f"-{args.plan}" if args.plan != "default" else ""
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    title = "Against OpenRLHF's serve_rm.py" if args.peers else "Servers under load"
    (out / f"{name}.md").write_text("\n".join(server_markdown(results, title=title)).lstrip() + "\n")
    for row in results["speedups"]:
        cpu = row.get("cpu_per_item_ratio")
        print(
            f"{row['model']} {row['workload']} C={row['concurrency']} {row['server']} vs "
            f"{row.get('against', 'baseline')}: {row['speedup']:.2f}x items/s"
            + (f", {cpu:.2f}x server CPU per item" if cpu is not None else "")
        )
    return results


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def add_peer_args(parser: argparse.ArgumentParser) -> None:
    """The peer comparison's flags (shared with ``rmserve bench``)."""
    parser.add_argument(
        "--openrlhf-python",
        default=None,
        help="the peer's interpreter (the setup script's venv; default: $RMSERVE_BENCH_OPENRLHF_PYTHON, else "
        "<$TMPDIR or /tmp>/orlhf-venv/bin/python when it exists)",
    )
    parser.add_argument(
        "--openrlhf-pythonpath",
        default=None,
        help="PYTHONPATH holding OpenRLHF's source and the stand-ins, 'stubs:src' "
        "(default: $RMSERVE_BENCH_OPENRLHF_PYTHONPATH, else the setup script's)",
    )
    parser.add_argument(
        "--openrlhf-attn",
        default="sdpa",
        help="serve_rm.py --ds.attn_implementation (its default flash_attention_2 needs flash-attn)",
    )
    parser.add_argument(
        "--no-inprocess",
        action="store_true",
        help="leave out rmserve --runtime inprocess even when rmserve serve has it",
    )
    parser.add_argument(
        "--threads",
        default=None,
        help="peer comparison thread settings, one after the other: defaults (each server's own), one (all on one "
        "torch thread, names end in -1t); default: defaults with --quick, else defaults,one",
    )


def add_filter_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--servers", default=None, help="only these servers, e.g. openrlhf,rmserve")
    parser.add_argument("--models", default=None, help="only these models of the plan, e.g. tiny-1L")
    parser.add_argument("--workloads", default=None, help="only these workloads of the plan, e.g. ppo-query")


if __name__ == "__main__":
    main()
