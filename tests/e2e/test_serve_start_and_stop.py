"""`rmserve serve` as a user starts it, in the states before it serves: a resource request the machine cannot hold
fails at start with what was asked and what exists; SIGTERM while the application is still deploying stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from test_cli_serve import free_port, rmserve_command

pytestmark = pytest.mark.ray

EXIT_TIMEOUT_S = 120.0  # generous: Ray starts and stops on a busy 2-core machine
WAIT_TIMEOUT_S = 180.0


def start(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.Popen, Path, str]:
    port = free_port()
    log = tmp_path / "rmserve.log"
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    environ.pop("RMSERVE_CONFIG", None)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*rmserve_command(), "serve", "--port", str(port), "--dtype", "fp32", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environ,
        )
    return proc, log, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_cpus_the_machine_does_not_have_fail_at_start_with_what_was_asked(tmp_path, demo_model_dir):
    proc, log, _ = start(tmp_path, "--ray-num-cpus", "2", "--num-cpus", "2")
    try:
        code = proc.wait(timeout=EXIT_TIMEOUT_S)
    finally:
        stop(proc)
    text = log.read_text()
    assert code == 1, text[-3000:]
    assert "rmserve: error:" in text and "asks for 2.25 CPUs and 0 GPUs" in text and "Ray has 2 CPUs" in text
    assert "rmserve: serving" not in text


def gateway_up_scorer_loading(url: str) -> bool:
    try:
        health = httpx.get(f"{url}/health", timeout=5.0)
        ready = httpx.get(f"{url}/ready", timeout=10.0)
    except httpx.TransportError:
        return False
    return health.status_code == 200 and ready.status_code == 503


@pytest.mark.slow  # a Ray start plus a deploy that never finishes: ~20 s; `make test-all`
def test_sigterm_while_the_application_is_still_deploying_stops_the_server(tmp_path, demo_model_dir):
    # The Scorer's constructor sleeps for ten minutes (a test hook), so the application stays in its starting state.
    proc, log, url = start(tmp_path, "--ray-num-cpus", "2", RMSERVE_TESTING__SCORER_START_DELAY_S="600")
    try:
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while not gateway_up_scorer_loading(url):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the Gateway never came up:\n" + log.read_text()[-3000:]
            time.sleep(0.5)
        assert "rmserve: serving" not in log.read_text()  # still starting
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=EXIT_TIMEOUT_S) == 0, log.read_text()[-3000:]
    finally:
        stop(proc)
    assert "rmserve: stopped while starting" in log.read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2.0)
