"""`serve run deploy/serve_config.yaml` (Ray Serve's own CLI) with the model overridden to the demo on CPU."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from metrics_scrape import Scrape

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
STARTUP_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_run_deploy_config_scores_with_the_demo(tmp_path, demo_model_dir, demo_model):
    config = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    port = _free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}  # the only edit: loopback and a free port
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        # RMSERVE_* variables override the file's args (how an operator tries the file on a laptop).
        "RMSERVE_MODEL__PATH": str(demo_model_dir),
        "RMSERVE_MODEL__DTYPE": "fp32",
        "RMSERVE_MODEL__DEVICE": "cpu",
        "RMSERVE_NUM_GPUS": "0",
        "RMSERVE_NUM_CPUS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
    }
    serve_cli = Path(sys.executable).with_name("serve")
    log = tmp_path / "serve-run.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(serve_cli), "run", str(path)], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve run exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"not ready within {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        items = [
            {"prompt": "Tell me about kites.", "response": "Gladly! Kites have a long history."},
            {"prompt": "Tell me about kites.", "response": "Figure it out yourself."},
        ]
        response = httpx.post(f"{url}/v1/score", json={"items": items}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["rewards"] == pytest.approx(demo_model.score(items), abs=1e-5)
        assert httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["max_length"] == 4096  # from the file
        # The app's own MetricsHub deployment collects the totals, deployed from the file like the rest.
        assert Scrape(httpx.get(f"{url}/metrics", timeout=30).text)("items_scored_total") == len(items)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
