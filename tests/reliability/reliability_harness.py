"""Shared pieces of the reliability tests (issue 7).

* ``serve_instance``: ONE local Ray instance with Serve's HTTP proxy on a loopback port for the whole
  ``tests/reliability`` package; each module deploys its own application on it (``deployed``) and deletes it
  when done, which saves starting Ray once per module.
* ``distinct_items`` / ``Workload``: items that are all different, in every item form, spread over the routes
  (native and compatibility) as real requests, each remembering which items its answer must score.
* ``ServerMemory``: resident memory of the server's processes (the Ray worker processes of the application's
  replicas and of Serve's proxy), sampled on a thread.
* ``Figures``: the numbers the issue asks for, printed at the end of the run (and saved as JSON).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from local_ray import start_local_ray

from rmserve.model.synthetic import FACTS, POLITE, PROMPTS, RUDE, TOPICS
from rmserve.serve import build_app
from rmserve.serve.config.loading import load_config
from rmserve.serve.config.settings import ServerConfig

TOL = 1e-5  # fp32 rewards: server vs offline
ITEM_FORMS = ("pair", "conversation", "text", "tokens")
VOCAB_LOW, VOCAB_HIGH = 3, 700  # token ids of tokens items (the demo vocabulary has 704 ids; 0-2 are special)


# -- Ray / Serve -------------------------------------------------------------------------------------
@dataclass
class ServeInstance:
    url: str  # http://127.0.0.1:<port> of Serve's proxy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def ray_serve_instance(ray_cpus: int = 4) -> Iterator[ServeInstance]:
    import ray
    from ray import serve

    from rmserve.serve.rayserve.server import THROUGHPUT_ENVIRONMENT, export_environment

    export_environment(THROUGHPUT_ENVIRONMENT)  # the Ray Serve settings rmserve serve and KubeRay run with
    start_local_ray(ray_cpus)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield ServeInstance(url=f"http://127.0.0.1:{port}")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@dataclass
class App:
    """One deployed rmserve application."""

    url: str
    config: ServerConfig

    @property
    def name(self) -> str:
        return self.config.app_name

    def scorer(self):
        from ray import serve

        return serve.get_deployment_handle("Scorer", app_name=self.name)

    async def stats(self) -> dict:
        return await self.scorer().stats.remote()

    async def set_faults(self, **plan: Any) -> None:
        await self.scorer().set_faults.remote(**plan)

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
        return httpx.AsyncClient(base_url=self.url, timeout=kwargs.pop("timeout", 120.0), limits=limits, **kwargs)


def app_config(model_dir: Path, name: str, environ: dict[str, str] | None = None, **overrides: Any) -> ServerConfig:
    """The demo model in fp32 on CPU, as application ``name``, plus ``environ`` (``RMSERVE_*`` variables) and
    ``overrides`` (ServerConfig fields), loaded the way ``rmserve serve`` loads its configuration."""
    base = {
        "model": {"path": str(model_dir), "dtype": "fp32", "device": "cpu"},
        "num_cpus": 1,
        "gateway_num_cpus": 0.25,
        "app_name": name,
    }
    return load_config(base=base, environ=environ, overrides=overrides)


@contextlib.contextmanager
def deployed(instance: ServeInstance, config: ServerConfig, prefix: str) -> Iterator[App]:
    """Deploy ``build_app(config)`` at ``prefix`` (blocks until it is ready); delete it afterwards. Several
    applications live side by side in the package's Ray instance, each under its own prefix."""
    from ray import serve

    serve.run(build_app(config), name=config.app_name, route_prefix=prefix)
    try:
        yield App(url=instance.url + prefix.rstrip("/"), config=config)
    finally:
        serve.delete(config.app_name)


async def routes(client: httpx.AsyncClient) -> set[str]:
    """The POST routes the application documents (compatibility routes included once they exist)."""
    schema = (await client.get("/openapi.json")).json()
    return {path for path, ops in schema["paths"].items() if "post" in ops}


# -- items ---------------------------------------------------------------------------------------------
def _sentence(rng: random.Random, topic: str, serial: int) -> str:
    """A response of 1-12 sentences (so item lengths vary from a few to a few hundred tokens)."""
    opener = rng.choice(POLITE + RUDE)
    body = " ".join(f"{topic.capitalize()} {rng.choice(FACTS)}." for _ in range(rng.choice([1, 1, 2, 3, 6, 12])))
    return f"{opener} {body} (note {serial})"


def _prompt(rng: random.Random, topic: str, serial: int) -> str:
    return f"{rng.choice(PROMPTS).format(t=topic)} Case {serial}."


def make_item(form: str, rng: random.Random, serial: int) -> dict:
    """One item of ``form``; ``serial`` makes it different from every other item."""
    topic = rng.choice(TOPICS)
    if form == "pair":
        return {"prompt": _prompt(rng, topic, serial), "response": _sentence(rng, topic, serial)}
    if form == "conversation":
        turns = [{"role": "user", "content": _prompt(rng, topic, serial)}]
        if rng.random() < 0.3:
            turns = [{"role": "system", "content": "Be helpful."}, *turns]
        return {"messages": [*turns, {"role": "assistant", "content": _sentence(rng, topic, serial)}]}
    if form == "text":
        return {"text": f"{_prompt(rng, topic, serial)} {_sentence(rng, topic, serial)}"}
    if form == "tokens":
        length = rng.choice([rng.randint(2, 16), rng.randint(17, 96), rng.randint(97, 400)])
        return {"input_ids": [serial % 7 + VOCAB_LOW] + [rng.randint(VOCAB_LOW, VOCAB_HIGH) for _ in range(length)]}
    raise ValueError(form)


def item_key(item: dict) -> str:
    return json.dumps(item, sort_keys=True, separators=(",", ":"))


def distinct_items(n: int, seed: int, forms: tuple[str, ...] = ITEM_FORMS) -> list[dict]:
    """``n`` pairwise different items, forms drawn at random."""
    rng = random.Random(seed)
    items, seen = [], set()
    serial = 0
    while len(items) < n:
        item = make_item(rng.choice(forms), rng, serial)
        serial += 1
        if (key := item_key(item)) not in seen:
            seen.add(key)
            items.append(item)
    return items


def ids_of_length(length: int, seed: int) -> list[int]:
    """A tokens item's ids of exactly ``length`` tokens (fault plans key on item length)."""
    rng = random.Random(seed)
    return [rng.randint(VOCAB_LOW, VOCAB_HIGH) for _ in range(length)]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


_REFERENCES: dict[str, Any] = {}


def offline_model(spec):
    """The model loaded in the test process exactly as a replica loads it (``config.model_spec()``): the
    reference for every reward the server returns. Cached per spec."""
    from rmserve.model import load_reward_model

    key = spec.model_dump_json()
    if key not in _REFERENCES:
        _REFERENCES[key] = load_reward_model(spec)
    return _REFERENCES[key]


def offline_scores(model, items: list[dict], chunk: int = 512) -> list[float]:
    """``model.score(items)`` in chunks, on one torch thread: on a shared 2-core machine that is ~10x faster
    than torch's default thread count (the replicas run on one thread too). The thread count is restored."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: list[float] = []
        for start in range(0, len(items), chunk):
            out += model.score(items[start : start + chunk])
        return out
    finally:
        torch.set_num_threads(threads)


# -- requests over every route ------------------------------------------------------------------------
@dataclass
class Request:
    """One HTTP request and the items (in ``Workload.items``) whose rewards its answer carries."""

    route: str
    body: dict
    item_ids: list[int]  # indices into Workload.items, in the order ``rewards_of`` returns them


def rewards_of(request: Request, answer: dict) -> list[float]:
    """The rewards in a 200 answer, one per ``request.item_ids`` entry, read the way each route reports them."""
    route = request.route
    if route in ("/v1/score", "/score"):
        return answer["rewards"]
    if route == "/get_reward":
        assert answer["rewards"] == answer["scores"]
        return answer["rewards"]
    if route == "/classify":
        data = sorted(answer["data"], key=lambda d: d["index"])
        assert [d["index"] for d in data] == list(range(len(request.item_ids)))
        return [d["probs"][0] for d in data]  # use_activation false: the raw reward
    if route == "/v1/preference":
        out = []
        for result in answer["results"]:
            out += [result["reward_a"], result["reward_b"]]
        return out
    if route == "/v1/rerank":
        out = []
        for group, result in zip(request.body["groups"], answer["results"], strict=True):
            ranking = result["ranking"]
            indices = [r["index"] for r in ranking]
            assert sorted(indices) == list(range(len(group["responses"]))), "a response is missing or repeated"
            by_index = {r["index"]: r["reward"] for r in ranking}
            assert [r["reward"] for r in ranking] == sorted(by_index.values(), reverse=True)
            assert result["best_index"] == indices[0]
            out += [by_index[k] for k in range(len(group["responses"]))]
        return out
    raise ValueError(route)


@dataclass
class Workload:
    """Distinct items spread over requests of random sizes on a mix of routes."""

    items: list[dict] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def _add(self, item: dict) -> int:
        self.items.append(item)
        return len(self.items) - 1


def random_size(rng: random.Random, most: int) -> int:
    """Mostly single items (what RL trainers send), sometimes a few, sometimes many."""
    roll = rng.random()
    if roll < 0.55:
        return 1
    if roll < 0.9:
        return rng.randint(2, min(16, most))
    return rng.randint(min(17, most), most)


def build_workload(n_items: int, seed: int, available: set[str], max_request_items: int = 64) -> Workload:
    """At least ``n_items`` distinct items as requests over the routes in ``available``."""
    rng = random.Random(seed)
    workload = Workload()
    serial = 10_000_000 * (seed % 97 + 1)  # distinct from other workloads' items
    seen: set[str] = set()

    def fresh(form: str) -> dict:
        nonlocal serial
        while True:
            serial += 1
            item = make_item(form, rng, serial)
            if (key := item_key(item)) not in seen:
                seen.add(key)
                return item

    mix = [
        r for r in ("/v1/score", "/score", "/v1/preference", "/v1/rerank", "/get_reward", "/classify") if r in available
    ]
    while len(workload.items) < n_items:
        route = rng.choice(mix)
        size = random_size(rng, max_request_items)
        if route in ("/v1/score", "/score"):
            form = rng.choice(ITEM_FORMS)  # one request uses one item form
            items = [fresh(form) for _ in range(size)]
            ids = [workload._add(i) for i in items]
            body = {"items": items}
        elif route in ("/get_reward", "/classify"):
            items = [fresh("text") for _ in range(size)]
            ids = [workload._add(i) for i in items]
            texts = [i["text"] for i in items]
            if route == "/get_reward":
                body = {"query": texts}
            else:
                single = size == 1 and rng.random() < 0.5
                body = {"input": texts[0] if single else texts, "use_activation": False}
        elif route == "/v1/preference":
            pairs, ids = [], []
            for _ in range(max(1, size // 2)):
                a, b = fresh("pair"), fresh("pair")
                b = {"prompt": a["prompt"], "response": b["response"]}
                if item_key(b) in seen:
                    continue
                seen.add(item_key(b))
                ids += [workload._add(a), workload._add(b)]
                pairs.append({"prompt": a["prompt"], "response_a": a["response"], "response_b": b["response"]})
            body = {"pairs": pairs}
        else:  # /v1/rerank
            groups, ids = [], []
            left = size
            while left > 0:
                k = min(left, rng.randint(1, 8))
                first = fresh("pair")
                group = [first] + [
                    {"prompt": first["prompt"], "response": fresh("pair")["response"]} for _ in range(k - 1)
                ]
                for item in group[1:]:
                    seen.add(item_key(item))
                ids += [workload._add(i) for i in group]
                groups.append({"prompt": first["prompt"], "responses": [i["response"] for i in group]})
                left -= k
            body = {"groups": groups}
        workload.requests.append(Request(route, body, ids))
    return workload


# -- latency ---------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def idle_latencies(client: httpx.AsyncClient, n: int, seed: int) -> list[float]:
    """Seconds of ``n`` sequential single-item /v1/score requests (one short pair item each)."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        topic = rng.choice(TOPICS)
        body = {"items": [{"prompt": f"Tell me about {topic}.", "response": f"{topic.capitalize()} are nice. {k}"}]}
        started = time.perf_counter()
        response = await client.post("/v1/score", json=body)
        out.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


# -- memory ----------------------------------------------------------------------------------------------
class ServerMemory:
    """Resident memory (MiB) of the server's processes: the replicas of ``app_name`` and Serve's proxy.

    Ray starts every worker as a descendant of this (driver) process and titles it ``ray::ServeReplica:<app>:
    <deployment>`` or ``ray::ProxyActor``, so other engineers' Ray instances on the machine are never counted.
    ``pids`` adds processes known otherwise (e.g. the Scorer's ``stats()["pid"]``).
    """

    def __init__(self, app_name: str, pids: tuple[int, ...] = ()):
        self.app_name = app_name
        self.extra = set(pids)
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def processes(self) -> dict[str, psutil.Process]:
        found: dict[str, psutil.Process] = {}
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                title = " ".join(proc.cmdline())
                if f"ServeReplica:{self.app_name}:" in title or "ray::ProxyActor" in title or proc.pid in self.extra:
                    # "ray::ServeReplica:<app>:Gateway.handle_request" -> "Gateway" (Ray appends the running method)
                    role = title.split()[0].split(":")[-1].split(".")[0] if title.startswith("ray::") else "process"
                    found[f"{role}[{proc.pid}]"] = proc
        return found

    def sample(self) -> dict[str, float]:
        """MiB per process now, plus ``total``."""
        out = {}
        for label, proc in self.processes().items():
            with contextlib.suppress(psutil.Error):
                out[label] = proc.memory_info().rss / 2**20
        out["total"] = sum(out.values())
        return out

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            for label, mib in self.sample().items():
                self.peak[label] = max(self.peak.get(label, 0.0), mib)

    @contextlib.contextmanager
    def watching(self, every_s: float = 0.1) -> Iterator[ServerMemory]:
        """Sample on a thread while the block runs; ``peak`` holds the largest values seen."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=10)
            for label, mib in self.sample().items():
                self.peak[label] = max(self.peak.get(label, 0.0), mib)


def rounded(sample: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in sample.items()}


# -- figures ------------------------------------------------------------------------------------------
class Figures:
    """Numbers the tests measured, printed in pytest's terminal summary and merged into ``path`` (JSON)."""

    def __init__(self, path: Path):
        self.path = path
        self.values: dict[str, dict[str, Any]] = {}

    def record(self, section: str, **values: Any) -> None:
        self.values.setdefault(section, {}).update(values)

    def save(self) -> None:
        """Write this run's sections over those of earlier runs (a CI run and a slow run add up to one file)."""
        if self.values:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            earlier = json.loads(self.path.read_text()) if self.path.exists() else {}
            self.path.write_text(json.dumps({**earlier, **self.values}, indent=2, sort_keys=True) + "\n")

    def lines(self) -> list[str]:
        out = []
        for section, values in sorted(self.values.items()):
            out.append(f"{section}:")
            out += [f"    {key}: {json.dumps(value)}" for key, value in sorted(values.items())]
        return out
