"""`rmserve serve` as a user starts it: a subprocess with the demo model, /ready, a score, SIGTERM → exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.ray

STARTUP_TIMEOUT_S = 180.0
SHUTDOWN_TIMEOUT_S = 60.0


def rmserve_command() -> list[str]:
    script = Path(sys.executable).parent / "rmserve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "rmserve.serve.cli.main"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, log: Path) -> httpx.Response:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"rmserve exited with {proc.returncode} before it was ready:\n{log.read_text()[-3000:]}")
        try:
            response = httpx.get(f"{url}/ready", timeout=5.0)
            if response.status_code == 200 and "rmserve: serving" in log.read_text():  # deployed and announced
                return response
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"rmserve was not ready within {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def test_serve_demo_answers_and_exits_0_on_sigterm(tmp_path, demo_model):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "rmserve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RMSERVE_CONFIG", None)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*rmserve_command(), "serve", "--port", str(port), "--ray-num-cpus", "4", "--dtype", "fp32"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        ready = wait_ready(proc, url, log)
        assert ready.json() == {"status": "ready", "model": "rmserve-demo"}  # no --model: the demo
        items = [
            {"prompt": "Tell me about tea.", "response": "Gladly! Tea has a long history."},
            {"prompt": "Tell me about tea.", "response": "Ugh, whatever. Bridges are boring."},
        ]
        response = httpx.post(f"{url}/v1/score", json={"items": items}, timeout=30.0)
        assert response.status_code == 200, response.text
        rewards = response.json()["rewards"]
        assert rewards == pytest.approx(demo_model.score(items), abs=1e-5)
        assert rewards[0] > rewards[1]
        assert f"rmserve: serving 'demo' at {url}" in log.read_text()

        # A 5 MB body crosses from the Gateway to the Scorer over gRPC (rmserve serve's Ray settings), past gRPC's
        # default 4 MiB message limit; meanwhile its tokenization (own thread) does not hold up a small request.
        big_item = {"text": "Tea is lovely. " * 350_000}

        async def big_and_small() -> tuple[httpx.Response, httpx.Response, bool]:
            async with httpx.AsyncClient(base_url=url, timeout=120.0) as client:
                big = asyncio.ensure_future(client.post("/v1/score", json={"items": [big_item]}))
                await asyncio.sleep(0.3)
                small = await client.post("/v1/score", json={"items": items[:1]})
                small_first = not big.done()
                return await big, small, small_first

        big, small, small_first = asyncio.run(big_and_small())
        assert big.status_code == 200, big.text
        assert big.json()["truncated"] == [0]
        assert big.json()["rewards"] == pytest.approx(demo_model.score([big_item]), abs=1e-5)
        assert small.status_code == 200 and small.json()["rewards"] == pytest.approx(rewards[:1], abs=1e-5)
        assert small_first, "the small request waited for the big one's tokenization"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=SHUTDOWN_TIMEOUT_S) == 0, log.read_text()[-3000:]
        assert "rmserve: shutting down" in log.read_text()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_invalid_configuration_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [*rmserve_command(), "serve", "--port", "0", "--max-batch-items", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "RMSERVE_CONFIG"},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rmserve: error: invalid configuration:"), result.stderr
    assert "batching.max_batch_items" in lines[0] and "port" in lines[0]
