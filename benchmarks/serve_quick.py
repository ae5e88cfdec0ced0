"""Quick HTTP benchmark of the Ray Serve app: throughput at 1 vs N concurrent single-item clients, the mean
batch size the Scorer formed, and single-request latency on an idle server. One process, one run.

    python -m rmserve.benchmarks.serve_quick                 # demo model, 1 vs 64 clients
    python benchmarks/serve_quick.py --clients 1 16 64 --seconds 10 --out bench-results/serve_quick.json

Every client sends one item per request and waits for the answer before sending the next (closed loop),
the way a PPO rollout worker calls a remote reward model. The server runs in a local Ray instance on
127.0.0.1 with the settings given (defaults: the server's own).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import httpx

from rmserve.model.synthetic import make_preference_pairs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def workload(n: int) -> list[dict]:
    pairs = make_preference_pairs(max(1, n // 2), seed=77)
    return [{"prompt": p["prompt"], "response": r} for p in pairs for r in (p["chosen"], p["rejected"])][:n]


async def closed_loop(url: str, clients: int, seconds: float, items: list[dict], scorer) -> dict:
    """``clients`` concurrent loops of one-item requests for ``seconds``; throughput and batch sizes."""
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    before = await scorer.stats.remote()
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:
        await client.post("/v1/score", json={"items": [items[0]]})  # connection warm-up
        before = await scorer.stats.remote()
        stop_at = time.perf_counter() + seconds

        async def loop(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                response = await client.post("/v1/score", json={"items": [items[i % len(items)]]})
                latencies.append(time.perf_counter() - started)
                errors += response.status_code != 200
                i += clients

        started = time.perf_counter()
        await asyncio.gather(*(loop(k) for k in range(clients)))
        elapsed = time.perf_counter() - started
    after = await scorer.stats.remote()
    batches = after["batching"]["batches"] - before["batching"]["batches"]
    batched_items = after["batching"]["items"] - before["batching"]["items"]
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "items_per_s": len(latencies) / elapsed,
        "mean_batch_size": batched_items / batches if batches else 0.0,
        "largest_batch": max(after["batching"]["recent_batch_sizes"][-batches:] or [0]) if batches else 0,
        "latency_p50_ms": 1000 * statistics.median(latencies),
        "latency_p99_ms": 1000 * percentile(latencies, 0.99),
    }


async def idle_latency(url: str, samples: int, items: list[dict]) -> dict:
    """One request at a time, with a pause between requests so each meets an idle server."""
    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
        for i in range(samples + 5):
            started = time.perf_counter()
            response = await client.post("/v1/score", json={"items": [items[i % len(items)]]})
            elapsed = time.perf_counter() - started
            assert response.status_code == 200, response.text
            if i >= 5:  # the first few warm the connection
                latencies.append(elapsed)
            await asyncio.sleep(0.02)
    return {
        "samples": samples,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "mean_ms": 1000 * statistics.fmean(latencies),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(args: argparse.Namespace, url: str) -> dict:
    from ray import serve

    scorer = serve.get_deployment_handle("Scorer", app_name="rmserve")
    items = workload(512)
    results = {"idle_latency": await idle_latency(url, args.idle_samples, items), "load": []}
    for clients in args.clients:
        results["load"].append(await closed_loop(url, clients, args.seconds, items, scorer))
    results["scorer_stats"] = await scorer.stats.remote()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="checkpoint directory or 'demo' (default: demo)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 64], help="concurrency levels (default: 1 64)")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each load level (default: 8)")
    parser.add_argument("--idle-samples", type=int, default=200, help="idle latency samples (default: 200)")
    parser.add_argument(
        "--batch-wait-timeout-s", type=float, default=None, help="server batching wait (default: server's)"
    )
    parser.add_argument("--ray-num-cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    parser.add_argument("--out", type=Path, default=Path("bench-results/serve_quick.json"))
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from rmserve.serve import build_app
    from rmserve.serve.config_loading import load_config

    overrides: dict = {"model": {"path": args.model}}
    if args.batch_wait_timeout_s is not None:
        overrides["batching"] = {"batch_wait_timeout_s": args.batch_wait_timeout_s}
    config = load_config(overrides=overrides)
    if args.model == "demo":
        from rmserve.model.demo import ensure_demo_model

        ensure_demo_model()
    ray.init(address="local", num_cpus=args.ray_num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name="rmserve", route_prefix="/")
        results = asyncio.run(run(args, f"http://127.0.0.1:{port}"))
    finally:
        serve.shutdown()
        ray.shutdown()
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    results["config"] = {"model": args.model, "batching": config.batching.model_dump()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))

    idle = results["idle_latency"]
    print(f"\nidle single-item latency: p50 {idle['p50_ms']:.1f} ms, p99 {idle['p99_ms']:.1f} ms", end="")
    print(f" ({idle['samples']} requests)")
    print(f"{'clients':>8} {'items/s':>9} {'mean batch':>11} {'largest':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for row in results["load"]:
        print(
            f"{row['clients']:>8} {row['items_per_s']:>9.1f} {row['mean_batch_size']:>11.2f} {row['largest_batch']:>8} "
            f"{row['latency_p50_ms']:>8.1f} {row['latency_p99_ms']:>8.1f} {row['errors']:>7}"
        )
    base = results["load"][0]["items_per_s"]
    for row in results["load"][1:]:
        print(f"speed-up {row['clients']} vs {results['load'][0]['clients']} clients: {row['items_per_s'] / base:.2f}x")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
