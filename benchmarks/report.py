"""Turn a results dict into ``results.md`` (tables, targets met or missed) and PNG plots (matplotlib, Agg).

python -m rmserve.benchmarks.report bench-results/results.json     # rewrite results.md and the plots
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = {
    "short_speedup": 4.0,  # rmserve ÷ baseline items/s, demo, short single items, 64 clients
    "ppo_speedup": 1.0,  # rmserve ÷ baseline items/s, bench-20M fp32, PPO single items, 64 clients
    "engine_mfu": 0.50,  # bench-20M fp32 engine MFU
    "padding_efficiency": 0.90,  # PPO mix
    "overhead_ms": 15.0,  # rmserve idle p50 minus engine time
}


def _find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def evaluate_targets(results: dict) -> list[dict]:
    """Each target of issue 6 with its measured value (None when that part did not run) and whether it is met."""
    server, engine = results.get("server", {}), results.get("engine", {})
    speed = server.get("speedups", [])
    short = _find(speed, model="demo", workload="short-single", concurrency=64, server="rmserve")
    ppo = _find(speed, model="bench-20M", workload="ppo-single", concurrency=64, server="rmserve")
    mfu = _find(engine.get("runs", []), config="bench-20M", precision="fp32", workload="ppo")
    idle = _find(server.get("overhead", []), server="rmserve")
    padding = results.get("padding", {}).get("engine", {}).get("padding_efficiency")
    fp32 = _find(engine.get("runs", []), config="bench-20M", precision="fp32")
    bf16 = _find(engine.get("runs", []), config="bench-20M", precision="bf16")
    rows = [
        ("demo, short items, 64 clients: rmserve ÷ baseline", short and short["speedup"], "≥ 4×", "short_speedup"),
        ("bench-20M fp32, PPO, 64 clients: rmserve ÷ baseline", ppo and ppo["speedup"], "≥ 1×", "ppo_speedup"),
        ("bench-20M fp32 engine MFU", mfu and mfu["mfu"], "≥ 50%", "engine_mfu"),
        ("padding efficiency, PPO mix", padding, "≥ 0.90", "padding_efficiency"),
    ]
    out = [
        {"target": name, "measured": value, "goal": goal, "met": None if value is None else value >= TARGETS[key]}
        for name, value, goal, key in rows
    ]
    overhead = idle and idle["overhead_ms"]
    out.append({"target": "serving overhead, idle p50 − engine (ms)", "measured": overhead, "goal": "≤ 15 ms",
                "met": None if overhead is None else overhead <= TARGETS["overhead_ms"]})  # fmt: skip
    # The CPU default (dtype auto) must be the faster of the two on this CPU: fp32 unless it has bf16 units.
    ratio = fp32 and bf16 and fp32["tokens_per_s"] / bf16["tokens_per_s"]
    default = results.get("machine", {}).get("cpu_default_dtype")
    faster = None if ratio is None else ("fp32" if ratio > 1 else "bf16")
    out.append({"target": f"CPU default dtype ({default or '?'}) is the faster: fp32 ÷ bf16 engine tokens/s",
                "measured": ratio, "goal": "> 1 if fp32 is the default, < 1 if bf16",
                "met": None if faster is None or default is None else faster == default})  # fmt: skip
    return out


def _fmt(value, spec: str = ".2f") -> str:
    if value is None:
        return "—"
    return format(value, spec) if isinstance(value, float | int) else str(value)


def markdown_table(headers: list[str], rows: list[list]) -> list[str]:
    """A markdown table, one line per row (the header and its rule first)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def markdown(results: dict) -> str:
    m = results.get("machine", {})
    lines = [
        "# rmserve benchmark results",
        "",
        f"Machine: {m.get('cpu')}, GPU: {m.get('gpu') or 'none'}; torch {m.get('torch')} "
        f"({m.get('torch_threads')} threads). 1-min load average at start: {_fmt(m.get('load_avg_1m'))}.",
        f"Command: `{results.get('command', '')}`; started {results.get('started', '')}, "
        f"took {_fmt(results.get('seconds'), '.0f')} s.",
        "",
        "## Targets (issue 6)",
        "",
    ]
    targets = results.get("targets", [])
    met = {True: "met", False: "**missed**", None: "not run"}
    rows = [[t["target"], _fmt(t["measured"]), t["goal"], met[t["met"]]] for t in targets]
    lines += markdown_table(["target", "measured", "goal", ""], rows)
    engine = results.get("engine")
    if engine:
        peaks = ", ".join(f"{k} {v:,.0f}" for k, v in engine["matmul_peak_gflop_per_s"].items())
        lines += ["", "## Engine alone", "",
                  f"Peak matmul GFLOP/s ({engine['matmul_size']}² matmul, best measured before or after a run): "
                  f"{peaks}. "
                  "MFU counts real tokens only (`benchmarks/flops.py`).", ""]  # fmt: skip
        lines += markdown_table(
            ["config", "precision", "workload", "items", "tokens/s", "items/s", "padding eff.", "GFLOP/s", "MFU",
             "weights GB"],
            [[r["config"], r["precision"], r["workload"], r["items"], f"{r['tokens_per_s']:,.0f}",
              f"{r['items_per_s']:,.1f}", f"{r['padding_efficiency']:.3f}", f"{r['model_gflop_per_s']:,.1f}",
              f"{r['mfu']:.1%}", f"{r['weights_gb']:.3f}"] for r in engine["runs"]],
        )  # fmt: skip
        for row in engine.get("reward_agreement", []):
            lines.append(f"\n{row['config']} {row['precision']} vs fp32 rewards: max |Δ| {row['max_abs_diff']:.4f} "
                         f"({row['max_abs_diff_over_std']:.1%} of the fp32 rewards' std).")  # fmt: skip
    padding = results.get("padding")
    if padding:
        lines += ["", "## Padding (PPO mix, same model and budget)", ""]
        policies = {name: r for name, r in padding.items() if isinstance(r, dict) and "padding_efficiency" in r}
        lines += markdown_table(
            ["policy", "padding efficiency", "padded tokens", "tokens/s"],
            [[n, f"{r['padding_efficiency']:.3f}", r["padded_tokens"], f"{r['tokens_per_s']:,.0f}"]
             for n, r in policies.items()],
        )  # fmt: skip
    lines += server_markdown(results.get("server"))
    lines += server_markdown(results.get("peers"), title="Against OpenRLHF's serve_rm.py")
    lines += ["", *[f"- {n}" for n in results.get("notes", [])]]
    return "\n".join(lines) + "\n"


def server_markdown(server: dict | None, title: str = "Servers under load") -> list[str]:
    if not server:
        return []
    dtype = f", {server['dtype']}" if server.get("dtype") else ""
    lines = ["", f"## {title} (median of {server['repeats']} interleaved repeats{dtype})", ""]
    for check in server.get("reward_checks", []):
        lines += reward_markdown(check) + [""]
    lines += markdown_table(
        ["model", "workload", "clients", "server", "items/s", "p50 ms", "p95 ms", "p99 ms", "failed",
         "server CPU ms/item", "loadgen CPU ms/item", "load"],
        [[p["model"], p["workload"], p["concurrency"], p["server"], f"{p['items_per_s']:,.1f}", f"{p['p50_ms']:,.1f}",
          f"{p['p95_ms']:,.1f}", f"{p['p99_ms']:,.1f}", p["requests_failed"], _fmt(p.get("server_cpu_ms_per_item")),
          _fmt(p.get("loadgen_cpu_ms_per_item")), f"{p['load_avg'][0]:.1f}"]
         for p in server["points"]],
    )  # fmt: skip
    lines += ["", "Server CPU counts the server's whole process tree (Ray's proxy, controller and replicas included); "
              "load is the 1-minute load average after the point (other work on the machine)."]  # fmt: skip
    ratios = server.get("speedups", [])
    if ratios and any("against" in r for r in ratios):  # the prefix and peer comparisons name what each is against
        lines += ["", "Throughput (items/s) of each server against another, and server CPU per item likewise:", ""]
        rows = [[r["model"], r["workload"], r["concurrency"], r["server"], r["against"], f"{r['speedup']:.2f}×",
                 _fmt(r.get("cpu_per_item_ratio"))] for r in ratios]  # fmt: skip
        lines += markdown_table(["model", "workload", "clients", "server", "against", "items/s", "CPU/item"], rows)
    elif ratios:
        lines += ["", "rmserve ÷ baseline throughput:", ""]
        lines += markdown_table(["model", "workload", "clients", "server", "speedup"],
                                [[s["model"], s["workload"], s["concurrency"], s["server"], f"{s['speedup']:.2f}×"]
                                 for s in ratios])  # fmt: skip
    if server.get("overhead"):
        lines += ["", "Idle single-item latency (sequential requests) minus the engine's own time for the items:", ""]
        lines += markdown_table(["server", "HTTP p50 ms", "engine p50 ms", "overhead ms"],
                                [[o["server"], f"{o['http_p50_ms']:.2f}", f"{o['engine_p50_ms']:.2f}",
                                  f"{o['overhead_ms']:.2f}"] for o in server["overhead"]])  # fmt: skip
    lines += ["", *[f"- {n}" for n in server["notes"]]] if server.get("notes") else []
    return lines


def reward_markdown(check: dict, shown: int = 4) -> list[str]:
    """One reward check: the first ``shown`` samples with every server's reward, and each server's largest |Δ|."""
    names = list(check["rewards"])
    n = min(shown, len(check["tokens"]))
    lines = [f"Rewards side by side, {check['model']} {check['workload']} ({len(check['tokens'])} samples scored "
             f"by every server before measuring, first {n} shown):", ""]  # fmt: skip
    lines += markdown_table(["tokens", *names],
                            [[check["tokens"][k], *(f"{check['rewards'][name][k]:.5f}" for name in names)]
                             for k in range(n)])  # fmt: skip
    for name, row in check["servers"].items():
        verdict = "agree" if row["agree"] else "**disagree**"
        lines.append(f"\n{name} vs {check['reference']}: max |Δ| {row['max_abs_diff']:.4g}, at most "
                     f"{row['max_rel_diff']:.2%} of |reward| + std ({check['reward_std']:.3g}): {verdict} "
                     f"(tolerance {check['rtol']:.2%}, {check['dtype']}).")  # fmt: skip
    return lines


def server_colours(servers: list[str]) -> dict[str, str]:
    """One colour per server, the same in every panel and plot (the order servers first appear in)."""
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
    return {s: palette[k % len(palette)] for k, s in enumerate(dict.fromkeys(servers))}


def plot(results: dict, out_dir: Path) -> list[Path]:
    """throughput_vs_concurrency.png and latency_percentiles.png (only when server points exist)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = results.get("server", {}).get("points", [])
    if not points:
        return []
    groups: dict[tuple[str, str], list[dict]] = {}
    for p in points:
        groups.setdefault((p["model"], p["workload"]), []).append(p)
    paths = []
    colour = server_colours([p["server"] for p in points])
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, ((model, workload), rows) in zip(axes[0], groups.items(), strict=True):
        for server in dict.fromkeys(r["server"] for r in rows):
            mine = sorted((r for r in rows if r["server"] == server), key=lambda r: r["concurrency"])
            xs, ys = [r["concurrency"] for r in mine], [r["items_per_s"] for r in mine]
            ax.plot(xs, ys, marker="o", label=server, color=colour[server])
        ax.set(title=f"{model}: {workload}", xlabel="concurrent clients", ylabel="items/s", xscale="log")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "throughput_vs_concurrency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, ((model, workload), rows) in zip(axes[0], groups.items(), strict=True):
        top = max(r["concurrency"] for r in rows)
        mine = [r for r in rows if r["concurrency"] == top]
        for k, q in enumerate(("p50_ms", "p95_ms", "p99_ms")):  # a server's colour, darker for higher percentiles
            xs, ys = [i + 0.27 * k for i in range(len(mine))], [r[q] for r in mine]
            ax.bar(xs, ys, width=0.27, color=[colour[r["server"]] for r in mine], alpha=0.45 + 0.25 * k)
        ax.set_xticks([i + 0.27 for i in range(len(mine))], [r["server"] for r in mine], fontsize=7)
        ax.set(title=f"{model}: {workload}, {top} clients (bars: p50, p95, p99)", ylabel="latency ms")
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    paths.append(out_dir / "latency_percentiles.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_report(results: dict, out_dir: Path) -> list[Path]:
    """results.json, results.md and the plots into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results["targets"] = evaluate_targets(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / "results.md").write_text(markdown(results))
    return [out_dir / "results.json", out_dir / "results.md", *plot(results, out_dir)]


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "bench-results/results.json")
    print(*write_report(json.loads(path.read_text()), path.parent), sep="\n")
