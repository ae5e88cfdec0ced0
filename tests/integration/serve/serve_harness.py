"""Ray Serve test harness: one local Ray instance per test module, the app on a random loopback port.

``running_app(config)`` starts Ray (local, dashboard off), Serve's HTTP proxy on 127.0.0.1:<free port>,
deploys ``build_app(config)`` and yields a ``LiveApp``; the module's tests share it.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from rmserve.serve import build_app
from rmserve.serve.config.loading import load_config
from rmserve.serve.config.settings import ServerConfig

APP_NAME = "rmserve"


@dataclass
class LiveApp:
    url: str
    config: ServerConfig

    def scorer(self, app_name: str = APP_NAME):
        from ray import serve

        return serve.get_deployment_handle("Scorer", app_name=app_name)

    async def stats(self, app_name: str = APP_NAME) -> dict:
        return await self.scorer(app_name).stats.remote()


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
def running_app(config: ServerConfig, *, ray_cpus: int = 4) -> Iterator[LiveApp]:
    import ray
    from ray import serve

    from rmserve.serve.rayserve.server import THROUGHPUT_ENVIRONMENT, export_environment

    export_environment(THROUGHPUT_ENVIRONMENT)  # the Ray Serve settings rmserve serve and KubeRay run with
    ray.init(address="local", num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False)
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


def async_client(app: LiveApp, **kwargs: Any) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    return httpx.AsyncClient(base_url=app.url, timeout=60.0, limits=limits, **kwargs)
