"""Issue 18 item 5 against a real server on both runtimes: ``POST /sleep`` → a scoring request gets 503 ``sleeping``
with ``Retry-After`` → ``POST /wake_up`` → rewards equal (``==``, fp32) to those before, at both levels, with SGLang's
aliases and the SDK; on Ray with 2 Scorer replicas both sleep and both wake (the hub's board and ``/metrics`` show each
replica); in the in-process runtime, where the model lives in this process, level 2 gives back at least the weights'
size of resident memory and takes it again on wake, and a request in a forward when the sleep arrives is scored while
one that arrives meanwhile gets the 503.

Prefix sharing is off: with it, a reward computed on cached prefix keys/values may differ from the whole item's in its
last bits (within 1e-5; batch-invariant mode makes them equal), and a sleep empties that cache.
The checkpoint is ``bench-20M``'s shape (35.4M parameters, 135 MiB in fp32) written in bf16 and served in fp32, so the
weights live in the process's heap (an fp32 file would be mapped, counting only the pages touched).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from metrics_scrape import scrape
from serve_harness import APP_NAME, RUNTIMES, LiveApp, async_client, free_port, running_app

from rmserve.client import AsyncRewardClient, SleepingError
from rmserve.serve.config.loading import load_config

pytestmark = pytest.mark.ray

ITEMS = [
    {"prompt": "What is the capital of France?", "response": "Paris, on the Seine."},
    {"prompt": "Name a prime number.", "response": "Seven is prime."},
    {"prompt": "Say something kind.", "response": "You did well today."},
]
GATE_WIDTH = 61


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from rmserve.benchmarks.models import save_random_checkpoint

    return save_random_checkpoint("bench-20M", tmp_path_factory.mktemp("sleep-bf16") / "rm-bf16", dtype="bf16")


@pytest.fixture(scope="module", params=RUNTIMES)
def app(request, checkpoint):
    runtime = request.param
    config = load_config(
        base={
            # Prefix sharing off: a reward computed on a cached prefix may differ in its last bits (within 1e-5) from
            # the whole item's, and a sleep empties the caches; this compares the weights' effect alone.
            "model": {
                "path": str(checkpoint),
                "dtype": "fp32",
                "device": "cpu",
                "forward_overhead_tokens": 64,
                "prefix_sharing": "off",
            },
            "num_cpus": 1,
            "gateway_num_cpus": 0.25,
            "replicas": 2 if runtime == "ray" else 1,
            "batching": {"batch_wait_timeout_s": 0.0},
            "limits": {"retry_after_s": 3},
        }
    )
    with running_app(config, runtime, ray_cpus=4) as live:
        yield live


@pytest.fixture
async def client(app):
    async with async_client(app) as c:
        yield c


def replicas(app: LiveApp) -> int:
    return 2 if app.runtime == "ray" else 1


async def scored(client, items=ITEMS) -> list[float]:
    response = await client.post("/v1/score", json={"items": items})
    assert response.status_code == 200, response.text
    return response.json()["rewards"]


async def board_levels(app: LiveApp) -> list[int]:
    """The sleep level each live Scorer replica reported to the hub's board (Ray runtime)."""
    from ray import serve

    from rmserve.serve.rayserve.metrics_hub import HUB_DEPLOYMENT

    return await serve.get_deployment_handle(HUB_DEPLOYMENT, app_name=APP_NAME).sleep_levels.remote("Scorer")


async def every_replica_watching(app: LiveApp) -> None:
    """Ray: wait until both Scorer replicas have reported to the board (they start watching as they start)."""
    if app.runtime != "ray":
        return
    deadline = time.monotonic() + 60
    while len(await board_levels(app)) < 2:
        assert time.monotonic() < deadline, "the Scorer replicas never reported to the sleep board"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("level", [1, 2])
async def test_sleep_refuse_wake_and_the_same_rewards(app: LiveApp, client, level):
    await every_replica_watching(app)
    before = await scored(client)
    metrics_before = await scrape(client)
    assert (await client.get("/is_sleeping")).json() == {"is_sleeping": False}

    # level 1 as vLLM's query parameter, level 2 as a JSON body (what a client that posts JSON sends)
    response = await (
        client.post("/sleep", params={"level": 1}) if level == 1 else client.post("/sleep", json={"level": 2})
    )
    assert response.status_code == 200 and response.json() == {"is_sleeping": True}
    assert (await client.get("/is_sleeping")).json() == {"is_sleeping": True}
    assert (await client.get("/ready")).status_code == 200  # up, and reachable for /wake_up
    if app.runtime == "ray":
        assert await board_levels(app) == [level, level]  # every replica sleeps

    for _ in range(4):  # whichever replica each reaches refuses it
        refused = await client.post("/v1/score", json={"items": ITEMS})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
        error = refused.json()["error"]
        assert error["type"] == "sleeping" and error["code"] == 503 and f"asleep (level {level})" in error["message"]
        assert set(error) == {"message", "type", "code", "param"}

    assert (await client.post("/sleep", params={"level": 3 - level})).status_code == 200  # asleep: unchanged
    asleep = await scrape(client)
    series = {dict(labels)["model"]: v for labels, v in asleep.series("sleep_level").items()}
    assert list(series.values()) == [level], series  # the lowest over the replicas: every one sleeps
    model = next(iter(series))
    count = "sleep_transition_seconds_count"
    fell = {"model": model, "transition": "sleep", "level": str(level)}
    assert asleep(count, **fell) - metrics_before(count, **fell) == replicas(app)  # one sleep per replica

    response = await client.post("/wake_up")
    assert response.status_code == 200 and response.json() == {"is_sleeping": False}
    assert (await client.post("/wake_up")).status_code == 200  # idempotent
    assert (await client.get("/is_sleeping")).json() == {"is_sleeping": False}
    assert await scored(client) == before  # bit for bit, fp32
    awake = await scrape(client)
    assert awake("sleep_level", model=model) == 0
    woke = {**fell, "transition": "wake"}
    assert awake(count, **woke) - metrics_before(count, **woke) == replicas(app)


async def test_sglang_aliases_and_the_sdk(app: LiveApp, client):
    await every_replica_watching(app)
    before = await scored(client)
    assert (await client.post("/release_memory_occupation", json={})).json() == {"is_sleeping": True}
    assert (await client.get("/is_sleeping")).json() == {"is_sleeping": True}
    assert (await client.post("/resume_memory_occupation", json={})).json() == {"is_sleeping": False}
    async with AsyncRewardClient(app.url, max_retries=0) as sdk:
        assert await sdk.sleep(2) is True and await sdk.is_sleeping() is True
        with pytest.raises(SleepingError) as info:
            await sdk.score_items(ITEMS)
        assert info.value.retry_after == 3
        assert await sdk.wake_up() is False and await sdk.is_sleeping() is False
        assert await sdk.score_items(ITEMS) == before


async def test_an_invalid_level_is_refused(client):
    refused = [{"params": {"level": level}} for level in ("0", "3", "two")]
    refused += [{"json": {"level": 3}}, {"json": {"level": True}}, {"params": {"level": 1}, "json": {"level": 2}}]
    for request in refused:
        response = await client.post("/sleep", **request)
        assert response.status_code == 422, request
        assert response.json()["error"]["param"] == "level" and response.json()["error"]["type"] == "invalid_request"
    assert (await client.get("/is_sleeping")).json() == {"is_sleeping": False}


# -- in-process runtime: the model lives in this process, or in one started for the measurement ---------------
def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


@pytest.fixture
def server_process(checkpoint, tmp_path):
    """``rmserve serve --runtime inprocess`` in a process of its own (nothing else in it moves its memory)."""
    port = free_port()
    settings = {
        "RUNTIME": "inprocess",
        "MODEL__PATH": str(checkpoint),
        "MODEL__DTYPE": "fp32",
        "MODEL__DEVICE": "cpu",
        "MODEL__FORWARD_OVERHEAD_TOKENS": "64",
        "MODEL__PREFIX_SHARING": "off",
    }
    env = {**os.environ, **{f"RMSERVE_{k}": v for k, v in settings.items()}}
    env.pop("RMSERVE_CONFIG", None)
    log = tmp_path / "server.log"
    with log.open("w") as out:
        command = [sys.executable, "-m", "rmserve.serve.cli.main", "serve", "--port", str(port)]
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not ready(url):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not become ready:\n" + log.read_text()[-3000:]
            time.sleep(0.2)
        yield proc, url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=5.0).status_code == 200
    except httpx.TransportError:
        return False


async def test_level_2_gives_back_the_weights_memory_and_takes_it_again(server_process):
    proc, url = server_process
    weights = 35_364_864 * 4  # bench-20M's parameters in fp32 (backbone; the head adds 2 KiB)
    async with httpx.AsyncClient(base_url=url, timeout=120.0) as client:
        before = await scored(client)
        for _ in range(2):  # a second round: the reloaded weights are given back as fully as the first ones
            awake = resident_bytes(proc.pid)
            assert (await client.post("/sleep", params={"level": 2})).status_code == 200
            asleep = resident_bytes(proc.pid)
            assert awake - asleep >= weights, f"RSS {awake / 2**20:.0f} -> {asleep / 2**20:.0f} MiB"
            assert (await client.post("/wake_up")).status_code == 200
            assert await scored(client) == before
            again = resident_bytes(proc.pid)
            assert again - asleep >= weights, f"RSS {asleep / 2**20:.0f} -> {again / 2**20:.0f} MiB after wake"


async def test_a_request_in_a_forward_is_scored_and_one_during_the_transition_is_refused(app: LiveApp, client):
    if app.runtime != "inprocess":
        pytest.skip("holds the forward thread of a core in this process")
    core = app.inprocess.cores[0]
    entered, release = threading.Event(), threading.Event()

    def gate(rows: int, width: int) -> None:
        if width == GATE_WIDTH:
            entered.set()
            release.wait(60)

    core.model.engine.fault_injector = gate
    try:
        in_forward = asyncio.ensure_future(client.post("/v1/score", json={"items": [{"input_ids": [5] * GATE_WIDTH}]}))
        assert await asyncio.to_thread(entered.wait, 60)
        falling = asyncio.ensure_future(client.post("/sleep"))
        deadline = time.monotonic() + 30
        while core.sleep_state != "falling asleep":  # the sleep reached the core (another thread's event loop)
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        refused = await client.post("/v1/score", json={"items": ITEMS})
        assert refused.status_code == 503 and "falling asleep" in refused.json()["error"]["message"]
        assert not falling.done()
        release.set()
        answered = await in_forward
        assert answered.status_code == 200 and len(answered.json()["rewards"]) == 1
        assert (await falling).json() == {"is_sleeping": True}
    finally:
        release.set()
        core.model.engine.fault_injector = None
    assert (await client.post("/wake_up")).status_code == 200
