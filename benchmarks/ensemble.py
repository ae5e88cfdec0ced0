"""A two-member ensemble served by one rmserve app against its two members on two rmserve servers, the client
combining their rewards itself; same machine, same load, in the same run.

The load: 64 closed-loop clients, PPO-shaped items (one per request, random token ids: distinct prompts, nothing
shared). *one app*: ``POST /v1/score`` with ``model: ens`` to one ``rmserve serve`` whose config serves members ``a``
and ``b`` (one Scorer each) and the ensemble ``ens``. *two servers*: each client sends the same request to both
members' servers at once, normalises each member's raw rewards with that member's statistics and combines them with
the server's own formula (``combine_members``: ``rmserve.serve.routing.ensemble.combine_rewards``). Both members load
the same checkpoint (a member's cost is its shape, not its weights; no cache is shared between two Scorers or two
servers), each with its own normalisation statistics (``MEMBER_STATS``, which the harness sets in every config).
Before measuring, eight other requests go to both setups and their combined rewards and spreads are compared.

Resources, defaults first: at ``num_cpus: auto`` the app's two Scorers share the machine's cores minus its Gateway's,
while each separate server gives its one Scorer all the cores but its Gateway's; *equal* then pins each separate
server's Scorer to the app's per-member share, so both setups run the same torch threads (the CPUs and threads of
each setup are printed). Each point runs on both setups in turn, repeated with alternating order and new items
each repeat (a replayed item would come from the reward cache); the median is kept.

    python -m rmserve.benchmarks.ensemble --quick
    python -m rmserve.benchmarks.ensemble             # demo and bench-20M, defaults and equal resources
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from rmserve.model.host import host_cores
from rmserve.serve.config.loading import load_config
from rmserve.serve.config.resources import Capacity, resolve_resources, torch_threads
from rmserve.serve.config.served_models import EnsembleConfig
from rmserve.serve.routing.ensemble import EnsembleRewards, combine_rewards

from .launch import RunningServer, free_port, rmserve_command, running_server
from .loadgen import BenchRequest, LoadResult
from .models import resolve_model_dir
from .report import markdown_table
from .scenarios import Scenario, build_requests
from .server import median_point, run_point

ENSEMBLE = EnsembleConfig(name="ens", members={"a": 1.0, "b": 1.0}, combine="mean_minus_std", lambda_=0.5)
MEMBER_STATS: dict[str, tuple[float, float]] = {"a": (0.0, 1.0), "b": (0.5, 2.0)}  # (reward_mean, reward_std)
CONCURRENCY = 64
AGREEMENT_REQUESTS = 8
AGREEMENT_SEED = 1  # the load's seeds are concurrency * 1000 + repeat: no item is sent twice to a server
APP, SEPARATE = "one app", "two servers"
MODELS = ("demo", "bench-20M")


@dataclass(frozen=True)
class Resources:
    """CPUs each member's Scorer reserves in each setup (``None``: ``num_cpus: auto``)."""

    name: str
    app_cpus: float | None = None
    separate_cpus: float | None = None


def ensemble_plan(quick: bool, models: Sequence[str] | None = None) -> list[Scenario]:
    """The PPO single-item point at 64 clients per model; ``quick``: the demo model only, fewer requests."""
    sizes = {"demo": (192, 8.0), "bench-20M": (64, 20.0)} if quick else {"demo": (2048, 20.0), "bench-20M": (192, 45.0)}
    chosen = models or (("demo",) if quick else MODELS)
    return [Scenario(m, "ppo-single", (CONCURRENCY,), *sizes[m]) for m in chosen]


def app_config(model_dir: str, cpus: float | None = None) -> dict:
    """The one-app setup: both members (each with its statistics) and the ensemble."""
    models = [
        {"name": m, "path": model_dir, "reward_mean": mean, "reward_std": std, **_cpus(cpus)}
        for m, (mean, std) in MEMBER_STATS.items()
    ]
    return {"models": models, "ensembles": [ENSEMBLE.model_dump(by_alias=True)]}


def member_config(model_dir: str, member: str, cpus: float | None = None) -> dict:
    """One server of the two-server setup: one member, with its statistics."""
    mean, std = MEMBER_STATS[member]
    return {"model": {"path": model_dir, "reward_mean": mean, "reward_std": std}, **_cpus(cpus)}


def _cpus(cpus: float | None) -> dict:
    return {} if cpus is None else {"num_cpus": cpus}


def scorer_cpus(config: Mapping, cores: float) -> float:
    """The CPUs each Scorer of ``config`` reserves on a machine of ``cores`` (resolved as ``rmserve serve`` does)."""
    resolved = resolve_resources(load_config(base=config), Capacity(cpus=cores, gpus=0))
    return float(resolved.served_models()[0].num_cpus)


def resource_plans(cores: float) -> list[Resources]:
    """Defaults first; then each separate server pinned to the CPUs the app's auto gives one member."""
    return [Resources("defaults"), Resources("equal", separate_cpus=scorer_cpus(app_config("."), cores))]


def describe_resources(plan: Resources, cores: float) -> dict[str, str]:
    """Per setup: the CPUs and torch threads of each member's Scorer (and what runs beside it)."""
    app = scorer_cpus(app_config(".", plan.app_cpus), cores)
    separate = scorer_cpus(member_config(".", "a", plan.separate_cpus), cores)
    return {
        APP: f"1 Ray instance: 2 Scorers x {app:g} CPUs, {torch_threads(app)} torch thread(s) each; 1 Gateway",
        SEPARATE: f"2 Ray instances: 1 Scorer x {separate:g} CPUs, {torch_threads(separate)} torch thread(s) "
        "each; 2 Gateways",
    }


def with_model(requests: Sequence[BenchRequest], model: str) -> list[BenchRequest]:
    """The same requests naming ``model`` (the originals are left as they are)."""
    return [BenchRequest(r.path, {**r.body, "model": model}, r.items) for r in requests]


def combine_members(raw: Mapping[str, Sequence[float]]) -> EnsembleRewards:
    """What a client of the two servers computes: each member's raw rewards normalised with its statistics,
    ``(r - mean) / std``, then combined with the server's own formula."""
    normalized = {m: [(r - MEMBER_STATS[m][0]) / MEMBER_STATS[m][1] for r in raw[m]] for m in ENSEMBLE.members}
    return combine_rewards(ENSEMBLE, normalized)


async def send_to_members(connections: Sequence[httpx.AsyncClient], request: BenchRequest) -> str | None:
    """The two-server setup's ``Send``: the request to every member at once, the answers combined here."""
    responses = await asyncio.gather(*(c.post(request.path, json=request.body) for c in connections))
    for response in responses:
        if response.status_code != 200:
            return f"HTTP {response.status_code}: {response.text[:200]}"
    combine_members({m: r.json()["rewards"] for m, r in zip(ENSEMBLE.members, responses, strict=True)})
    return None


async def max_disagreement(app_url: str, member_urls: Sequence[str], requests: Sequence[BenchRequest]) -> float:
    """Largest |difference| between the app's ensemble rewards and spreads and the client-combined ones."""
    worst = 0.0
    async with httpx.AsyncClient(timeout=120.0) as http:
        for request in requests:
            app = await http.post(app_url + request.path, json={**request.body, "model": ENSEMBLE.name})
            members = [await http.post(url + request.path, json=request.body) for url in member_urls]
            for response in (app, *members):
                response.raise_for_status()
            combined = combine_members({m: r.json()["rewards"] for m, r in zip(ENSEMBLE.members, members, strict=True)})
            served = app.json()
            for got, want in ((served["rewards"], combined.rewards), (served["spread"], combined.spread)):
                worst = max([worst, *(abs(x - y) for x, y in zip(got, want, strict=True))])
    return worst


def _start(stack: contextlib.ExitStack, config: dict, name: str, dtype: str, out_dir: Path) -> RunningServer:
    path = out_dir / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    command = rmserve_command(None, port, dtype, ["--config", str(path)])
    return stack.enter_context(running_server(command, port, log_path=out_dir / "logs" / f"{name}.log"))


def run_scenario(scenario: Scenario, plan: Resources, *, dtype: str, repeats: int, out_dir: Path,
                 progress=None) -> list[dict]:  # fmt: skip
    """Start both setups for ``scenario.model`` with ``plan``'s resources, check they agree, and measure each."""
    from transformers import AutoConfig

    model_dir = str(resolve_model_dir(scenario.model))
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size

    def requests(seed: int, n: int = scenario.n_requests) -> list[BenchRequest]:
        return build_requests(scenario.workload, "rmserve", vocab_size=vocab, n_requests=n, seed=seed,
                              ppo_shape=scenario.ppo_shape)  # fmt: skip

    tag = f"{Path(scenario.model).name}-{plan.name}"
    with contextlib.ExitStack() as stack:
        servers = {
            APP: [_start(stack, app_config(model_dir, plan.app_cpus), f"ensemble-app-{tag}", dtype, out_dir)],
            SEPARATE: [_start(stack, member_config(model_dir, m, plan.separate_cpus), f"ensemble-{m}-{tag}", dtype,
                              out_dir) for m in ENSEMBLE.members],
        }  # fmt: skip
        urls = {setup: [s.url for s in running] for setup, running in servers.items()}
        checked = requests(AGREEMENT_SEED, AGREEMENT_REQUESTS)
        agreement = asyncio.run(max_disagreement(urls[APP][0], urls[SEPARATE], checked))
        rows = []
        for concurrency in scenario.concurrencies:
            runs: dict[str, list[LoadResult]] = {APP: [], SEPARATE: []}
            for repeat in range(repeats):
                # Items never seen before by either setup (PPO rollouts do not repeat): a replayed item would be
                # answered from the server's reward cache.
                fresh = requests(seed=concurrency * 1000 + repeat)
                loads = {APP: (urls[APP][0], with_model(fresh, ENSEMBLE.name), {}),
                         SEPARATE: (urls[SEPARATE], fresh, {"send": send_to_members})}  # fmt: skip
                for setup in (APP, SEPARATE) if repeat % 2 == 0 else (SEPARATE, APP):
                    url, setup_requests, kwargs = loads[setup]
                    cpu = sum(s.cpu_seconds() for s in servers[setup])
                    point = run_point(url, setup_requests, scenario, setup, concurrency, **kwargs)
                    used = sum(s.cpu_seconds() for s in servers[setup]) - cpu
                    point.server_cpu_ms_per_item = used * 1000 / max(1, point.items_ok)
                    runs[setup].append(point)
            for setup, measured in runs.items():
                row = {"model": scenario.model, "dtype": dtype, "resources": plan.name, **median_point(measured),
                       "max_abs_diff": agreement, "load_avg": os.getloadavg()}  # fmt: skip
                rows.append(row)
                if progress:
                    progress(f"ensemble {scenario.model} {plan.name} C={concurrency} {setup}: "
                             f"{row['items_per_s']:.1f} items/s, p50 {row['p50_ms']:.1f} ms, "
                             f"p99 {row['p99_ms']:.1f} ms, failed {row['requests_failed']}")  # fmt: skip
    return rows


def side_by_side(rows: list[dict], resources: Mapping[str, Mapping[str, str]]) -> list[str]:
    """One markdown table: both setups per (model, resources, clients), and one app ÷ two servers."""
    by_key = {(r["model"], r["resources"], r["concurrency"], r["server"]): r for r in rows}
    table = []
    for (model, plan, concurrency, setup), r in by_key.items():
        other = by_key.get((model, plan, concurrency, SEPARATE))
        ratio = (
            f"{r['items_per_s'] / other['items_per_s']:.2f}x" if setup == APP and other and other["items_per_s"] else ""
        )
        table.append([model, plan, concurrency, setup, resources[plan][setup], f"{r['items_per_s']:,.1f}",
                      f"{r['p50_ms']:,.1f}", f"{r['p99_ms']:,.1f}", r["requests_failed"],
                      f"{r['server_cpu_ms_per_item']:.1f}", ratio, f"{r['max_abs_diff']:.1e}"])  # fmt: skip
    headers = ["model", "resources", "clients", "setup", "each member's Scorer", "items/s", "p50 ms", "p99 ms",
               "failed", "server CPU ms/item", "one app ÷ two servers", "max |Δ| reward, spread"]  # fmt: skip
    return markdown_table(headers, table)


def run_ensemble_benchmark(*, quick: bool, out_dir: Path, dtype: str = "fp32", repeats: int | None = None,
                           models: Sequence[str] | None = None, progress=None) -> dict:  # fmt: skip
    """Every scenario of the plan under every resource plan; returns the rows and how each setup was resourced."""
    cores = host_cores()
    plans = resource_plans(cores)
    repeats = repeats or (1 if quick else 2)
    rows: list[dict] = []
    for scenario in ensemble_plan(quick, models):
        for plan in plans:
            rows += run_scenario(scenario, plan, dtype=dtype, repeats=repeats, out_dir=out_dir, progress=progress)
    resources = {plan.name: describe_resources(plan, cores) for plan in plans}
    return {"cores": cores, "repeats": repeats, "ensemble": ENSEMBLE.model_dump(by_alias=True),
            "member_stats": MEMBER_STATS, "resources": resources, "points": rows}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the demo model only, fewer requests, one repeat")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats per point (default 1 quick, 2)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--out", default="bench-results", help="output directory (ensemble.json, configs, logs)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.models is not None:
        args.models = tuple(m.strip() for m in args.models.split(",") if m.strip())
        unknown = [m for m in args.models if m not in MODELS]
        if unknown or not args.models:
            parser.error(f"--models: {','.join(unknown) or 'empty'} is not one of {','.join(MODELS)}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_ensemble_benchmark(quick=args.quick, out_dir=out, dtype=args.dtype, repeats=args.repeats,
                                     models=args.models, progress=print)  # fmt: skip
    (out / "ensemble.json").write_text(json.dumps(results, indent=2))
    print(f"\n{results['cores']} cores; ensemble {ENSEMBLE.name}: members {dict(ENSEMBLE.members)}, "
          f"{ENSEMBLE.combine}, lambda {ENSEMBLE.lambda_}; median of {results['repeats']} repeat(s)\n")  # fmt: skip
    print("\n".join(side_by_side(results["points"], results["resources"])))
    return results


if __name__ == "__main__":
    main()
