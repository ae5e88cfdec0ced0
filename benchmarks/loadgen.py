"""An asyncio + httpx load generator: C concurrent clients replay a list of requests against a loopback server.

Each client sends its next request as soon as its previous one answered (closed loop, the trainer pattern).
A run stops when every request was sent or ``max_seconds`` passed, whichever comes first; throughput is
items answered ÷ wall time, latency percentiles are over successful requests. By default a request is one POST
to one server; ``send`` replaces that (e.g. the same request to several servers, answers combined by the client).

    python -m rmserve.benchmarks.loadgen --url http://127.0.0.1:8000 --concurrency 1,16,64 --requests 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

import httpx

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class BenchRequest:
    """One HTTP request: a POST of ``body`` to ``path`` that carries ``items`` items."""

    path: str
    body: dict
    items: int


@dataclass
class LoadResult:
    """One (server, workload, concurrency) point."""

    server: str
    workload: str
    concurrency: int
    requests_ok: int = 0
    requests_failed: int = 0
    items_ok: int = 0
    warmup_items: int = 0  # items of the uncounted warm-up requests (the server did their work too)
    seconds: float = 0.0
    items_per_s: float = 0.0
    requests_per_s: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    server_cpu_ms_per_item: float | None = None  # filled in by the caller that knows the server's processes
    loadgen_cpu_ms_per_item: float | None = None
    computed_over_received: float | None = None  # rmserve: forward tokens / received tokens (from /metrics)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


Send = Callable[[Sequence[httpx.AsyncClient], BenchRequest], Awaitable[str | None]]
"""How one client sends one request over its connections (one per URL, in order): ``None`` when it succeeded,
else what went wrong (one line)."""


async def post_request(connections: Sequence[httpx.AsyncClient], request: BenchRequest) -> str | None:
    """The default ``Send``: one POST to the one server; success is a 200."""
    response = await connections[0].post(request.path, json=request.body)
    return None if response.status_code == 200 else f"HTTP {response.status_code}: {response.text[:200]}"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"the load generator only targets loopback addresses, not {host!r}")


async def run_load(
    url: str | Sequence[str],
    requests: Sequence[BenchRequest],
    concurrency: int,
    *,
    server: str = "",
    workload: str = "",
    max_seconds: float = 60.0,
    request_timeout_s: float = 120.0,
    warmup: int = 0,
    send: Send = post_request,
) -> LoadResult:
    """Replay ``requests`` with ``concurrency`` clients; the first ``warmup`` requests are sent and not counted.

    ``url`` may be several servers: each client then holds one connection to each, and ``send`` uses them.
    """
    urls = [url] if isinstance(url, str) else list(url)
    for each in urls:
        check_loopback(each)
    result = LoadResult(server=server, workload=workload, concurrency=concurrency)
    latencies: list[float] = []
    pending = iter(requests[warmup:])  # shared by the clients: each request is sent exactly once
    # One connection per client and server (as separate trainer workers have): httpx's shared pool costs the load
    # generator O(connections) CPU per request at high concurrency, which on a small machine skews the servers.
    clients = [[httpx.AsyncClient(base_url=u, timeout=request_timeout_s, limits=httpx.Limits(max_connections=1))
                for u in urls] for _ in range(concurrency)]  # fmt: skip
    try:
        # Every client opens its connections first with an uncounted GET /health (any status will do; trainer
        # workers keep their connections open), so a short run measures serving, not 64 TCP handshakes.
        await asyncio.gather(*(c.get("/health") for connections in clients for c in connections))
        for request in requests[:warmup]:
            await send(clients[0], request)
            result.warmup_items += request.items
        started = time.perf_counter()
        deadline = started + max_seconds

        async def client_loop(connections: list[httpx.AsyncClient]) -> None:
            for request in pending:
                if time.perf_counter() >= deadline:
                    return
                sent = time.perf_counter()
                try:
                    failure = await send(connections, request)
                except httpx.HTTPError as exc:
                    failure = f"{type(exc).__name__}: {exc}"
                if failure is None:
                    latencies.append(time.perf_counter() - sent)
                    result.requests_ok += 1
                    result.items_ok += request.items
                else:
                    result.requests_failed += 1
                    if len(result.errors) < 5:
                        result.errors.append(failure)

        await asyncio.gather(*(client_loop(c) for c in clients))
        result.seconds = time.perf_counter() - started
    finally:
        await asyncio.gather(*(c.aclose() for connections in clients for c in connections))
    result.items_per_s = result.items_ok / result.seconds
    result.requests_per_s = result.requests_ok / result.seconds
    if latencies:
        ms = [x * 1000 for x in latencies]
        result.p50_ms, result.p95_ms, result.p99_ms = (percentile(ms, q) for q in (50, 95, 99))
        result.mean_ms = sum(ms) / len(ms)
    return result


def sweep(
    url: str,
    requests: Sequence[BenchRequest],
    concurrencies: Sequence[int],
    *,
    server: str = "",
    workload: str = "",
    max_seconds: float = 60.0,
    warmup: int = 4,
    progress=None,
) -> list[LoadResult]:
    """One ``run_load`` per concurrency level, each replaying the same requests from the start."""
    results = []
    for c in concurrencies:
        point = asyncio.run(
            run_load(url, requests, c, server=server, workload=workload, max_seconds=max_seconds, warmup=warmup)
        )
        results.append(point)
        if progress is not None:
            progress(point)
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    from rmserve.benchmarks.workloads import short_token_items

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="base URL of a server on loopback")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=256, help="single-item /v1/score requests per level")
    parser.add_argument("--vocab-size", type=int, default=700)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    items = short_token_items(args.requests, args.vocab_size)
    requests = [BenchRequest("/v1/score", {"items": [item]}, 1) for item in items]
    levels = [int(c) for c in args.concurrency.split(",")]
    points = sweep(args.url, requests, levels, max_seconds=args.max_seconds, workload="short-single")
    for p in points:
        print(f"C={p.concurrency:>4} {p.items_per_s:8.1f} items/s  p50 {p.p50_ms:7.1f} ms  p99 {p.p99_ms:7.1f} ms"
              f"  failed {p.requests_failed}")  # fmt: skip
    return [json.loads(json.dumps(p.to_dict())) for p in points]


if __name__ == "__main__":
    main()
