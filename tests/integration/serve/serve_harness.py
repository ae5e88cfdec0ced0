"""Server test harness: the app on a random loopback port, in either runtime, shared by a module's tests.

``running_app(config)`` starts Ray (local, dashboard off; one instance per test module), Serve's HTTP proxy on
127.0.0.1:<free port>, deploys ``build_app(config)`` and yields a ``LiveApp``. ``running_app(config, "inprocess")``
serves the in-process runtime's app (``rmserve serve --runtime inprocess``) with uvicorn on a thread of the test
process instead. ``RUNTIMES`` parametrises a module's ``app`` fixture over both.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from local_ray import start_local_ray

from rmserve.serve import build_app
from rmserve.serve.config.loading import load_config
from rmserve.serve.config.settings import ServerConfig

APP_NAME = "rmserve"
RUNTIMES = ("ray", "inprocess")


@dataclass
class LiveApp:
    url: str
    config: ServerConfig
    runtime: str = "ray"
    inprocess: Any = None  # the in-process runtime's InProcessApp (its scoring cores)

    def scorer(self, app_name: str = APP_NAME):
        """The first model's Scorer ``DeploymentHandle`` (Ray runtime only)."""
        from ray import serve

        assert self.runtime == "ray", "a Scorer handle exists only in the Ray runtime"
        return serve.get_deployment_handle("Scorer", app_name=app_name)

    async def stats(self, app_name: str = APP_NAME) -> dict:
        if self.runtime == "inprocess":
            return self.inprocess.cores[0].stats()
        return await self.scorer(app_name).stats.remote()

    async def set_faults(self, **plan: Any) -> None:
        """Fault injection in the first model's core (``testing.fault_injection`` must be on)."""
        if self.runtime == "ray":
            await self.scorer().set_faults.remote(**plan)
            return
        from rmserve.serve.core.faults import FaultPlan

        assert self.config.testing.fault_injection
        self.inprocess.cores[0].set_faults(FaultPlan(**plan))

    def only_ray(self) -> None:
        import pytest

        if self.runtime != "ray":
            pytest.skip("a Ray Serve feature (handles, deployments)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def demo_config(model_dir: Path, **overrides: Any) -> ServerConfig:
    """The demo model in fp32 on CPU, small per-replica CPU reservations, plus ``overrides``."""
    base = {
        "model": {"path": str(model_dir), "dtype": "fp32", "device": "cpu"},
        "num_cpus": 1,
        "gateway_num_cpus": 0.25,
    }
    return load_config(base=base, overrides=overrides)


@contextlib.contextmanager
def running_app(config: ServerConfig, runtime: str = "ray", *, ray_cpus: int = 4) -> Iterator[LiveApp]:
    if runtime == "inprocess":
        with running_inprocess(config) as live:
            yield live
        return
    import ray
    from ray import serve

    from rmserve.serve.rayserve.server import THROUGHPUT_ENVIRONMENT, export_environment

    export_environment(THROUGHPUT_ENVIRONMENT)  # the Ray Serve settings rmserve serve and KubeRay run with
    start_local_ray(ray_cpus)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        yield LiveApp(url=f"http://127.0.0.1:{port}", config=config)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@contextlib.contextmanager
def running_inprocess(config: ServerConfig) -> Iterator[LiveApp]:
    import uvicorn

    from rmserve.serve.inprocess.server import build_inprocess_app

    app = build_inprocess_app(config)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app.http, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="inprocess-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.02)
        yield LiveApp(url=f"http://127.0.0.1:{port}", config=config, runtime="inprocess", inprocess=app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        app.close()


def async_client(app: LiveApp, **kwargs: Any) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    return httpx.AsyncClient(base_url=app.url, timeout=60.0, limits=limits, **kwargs)
