"""Graceful shutdown of ``rmserve serve`` in both runtimes (driven as a user runs it, in a subprocess): on SIGTERM the
requests in flight finish with their correct rewards, new requests get 503 while they do (in one process the
listening socket also closes, so a new connection may be refused instead), and the process exits 0.
The API key given through ``RMSERVE_API_KEYS`` appears nowhere in the process's output.

Requests stay in flight for seconds without any test hook: ``RMSERVE_BATCHING__BATCH_WAIT_TIMEOUT_S`` makes the
Scorer wait that long for a batch to fill before it runs one.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.timeout(600)]
RUNTIME_FLAGS = {"ray": ["--ray-num-cpus", "4"], "inprocess": ["--runtime", "inprocess"]}

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from test_cli_serve import free_port, rmserve_command, wait_ready  # noqa: E402

BATCH_WAIT_S = 4.0
SHUTDOWN_TIMEOUT_S = 90.0
KEY = f"rk-shutdown-{secrets.token_hex(12)}"


def items_of(n: int) -> list[list[dict]]:
    return [
        [{"prompt": f"Tell me about tea, case {k}.", "response": f"Gladly! Tea {k} has a long history."}]
        for k in range(n)
    ]


# The default runtime in `make test`; the in-process runtime in `make soak` (its drain is shared code, unit-tested).
@pytest.mark.parametrize(
    "runtime", [pytest.param("ray", marks=pytest.mark.ray), pytest.param("inprocess", marks=pytest.mark.slow)]
)
async def test_sigterm_lets_in_flight_requests_finish_refuses_new_ones_and_exits_0(
    runtime, tmp_path, demo_model, figures
):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "rmserve.log"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "RMSERVE_API_KEYS": KEY,
        "RMSERVE_BATCHING__BATCH_WAIT_TIMEOUT_S": str(BATCH_WAIT_S),
    }
    env.pop("RMSERVE_CONFIG", None)
    headers = {"Authorization": f"Bearer {KEY}"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*rmserve_command(), "serve", "--port", str(port), *RUNTIME_FLAGS[runtime], "--dtype", "fp32"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_ready_with_key(proc, url, log)
        in_flight_items = items_of(6)
        async with httpx.AsyncClient(base_url=url, timeout=60.0, headers=headers) as client:
            in_flight = [asyncio.ensure_future(client.post("/v1/score", json={"items": i})) for i in in_flight_items]
            await asyncio.sleep(1.0)  # they wait for their batch (BATCH_WAIT_S)
            assert not any(t.done() for t in in_flight)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            # New requests while the old ones drain: refused with a retryable 503 (or, once the listener is closed,
            # not connected at all).
            refused = []
            for _ in range(3):
                try:
                    response = await client.post("/v1/score", json={"items": items_of(1)[0]})
                    refused.append(response.status_code)
                    if response.status_code == 503:
                        assert response.json()["error"]["type"] == "not_ready", response.text
                except httpx.TransportError:
                    refused.append("refused")
                await asyncio.sleep(0.2)
            answers = await asyncio.gather(*in_flight)
            drained = time.monotonic() - signalled
        for answer, items in zip(answers, in_flight_items, strict=True):
            assert answer.status_code == 200, answer.text
            assert answer.json()["rewards"] == pytest.approx(demo_model.score(items), abs=1e-5)
        if runtime == "ray":  # the Gateway keeps listening while it drains
            assert refused[0] == 503, refused
        assert all(r in (503, "refused") for r in refused), refused
        code = proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
        exited = time.monotonic() - signalled
        output = log.read_text()
        assert code == 0, output[-3000:]
        assert "rmserve: shutting down" in output
        assert KEY not in output
        figures.record(
            f"graceful shutdown ({runtime})",
            in_flight_completed=len(answers),
            new_requests_after_sigterm=refused,
            in_flight_done_after_s=round(drained, 1),
            exit_code=code,
            exited_after_s=round(exited, 1),
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def wait_ready_with_key(proc: subprocess.Popen, url: str, log: Path) -> None:
    """``wait_ready`` of the e2e CLI test, with the API key the server now requires on its scoring routes."""
    response = wait_ready(proc, url, log)  # /ready is open (protect_operational_routes is off)
    assert response.status_code == 200
    assert httpx.post(f"{url}/v1/score", json={"items": items_of(1)[0]}, timeout=30).status_code == 401
