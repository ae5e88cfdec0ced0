"""``rmserve serve --runtime inprocess``: the same edge, endpoints, scoring core and engine as the Ray runtime, in one
plain process: uvicorn serves the FastAPI app, whose routes call each model's ``ScoringCore`` directly
(``core.replica.LocalLink``). One copy of each model on this machine's device; nothing needs Ray, so it runs where
Ray is not installed (a bare GPU box) and shows what Ray costs.

What it does not do: replicas, autoscaling, several Gateways, several nodes (a configuration asking for them is
refused at start, naming the setting). SIGINT / SIGTERM: new requests get 503 ``not_ready`` and the listening socket
closes, requests in flight finish (up to the request deadline), then the process exits 0.

Example::

    app = build_inprocess_app(ServerConfig(model={"path": "demo"}))   # loads and warms up the models
    uvicorn.run(app.http, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI

from rmserve.model.host import host_cores
from rmserve.serve.cli.process import check_port_free, install_stop_signals
from rmserve.serve.config.loading import ConfigError
from rmserve.serve.config.resources import Capacity, resolve_resources
from rmserve.serve.config.settings import ServerConfig
from rmserve.serve.core.replica import LocalLink, load_scoring_core
from rmserve.serve.core.scoring_core import ScoringCore
from rmserve.serve.edge.drain import Drain
from rmserve.serve.edge.routes import create_http_app
from rmserve.serve.edge.service import GatewayService
from rmserve.serve.metrics.store import LocalMetrics


@dataclass
class InProcessApp:
    """The HTTP app, the scoring core of each served model (in ``config.served_models()`` order) and the drain."""

    http: FastAPI
    cores: list[ScoringCore]
    drain: Drain

    def close(self) -> None:
        for core in self.cores:
            core.close()


def check_inprocess(config: ServerConfig) -> None:
    """Refuse (``ConfigError``) what only the Ray runtime can do, naming the setting."""
    asked = []
    if config.autoscaling is not None:
        asked.append("autoscaling")
    if config.gateway_replicas != 1:
        asked.append(f"gateway_replicas: {config.gateway_replicas}")
    asked += [
        f"replicas: {m.replicas}" + (f" (model {m.name})" if m.name else "")
        for m in config.served_models()
        if m.replicas != 1
    ]
    if asked:
        raise ConfigError(
            f"runtime 'inprocess' serves one copy of each model in one process; {', '.join(asked)} needs "
            "runtime 'ray' (the default)"
        )


def build_inprocess_app(config: ServerConfig) -> InProcessApp:
    """Load every served model (torch on this machine's cores, its GPU when it has one), warm each up, and build the
    HTTP app around their cores."""
    check_inprocess(config)
    config = resolve_resources(config, Capacity(cpus=host_cores(), gpus=_gpus()))
    cores: list[ScoringCore] = []
    try:
        for index in range(len(config.served_models())):
            cores.append(load_scoring_core(config, index))
    except BaseException:
        for core in cores:
            core.close()
        raise
    metrics = LocalMetrics()
    metrics.sources.extend(core.metrics_snapshot for core in cores)
    service = GatewayService([LocalLink(core) for core in cores], config)
    drain = Drain()
    http = create_http_app(service, config, metrics=metrics, drain=drain)
    return InProcessApp(http=http, cores=cores, drain=drain)


def run_inprocess(config: ServerConfig, stop: threading.Event | None = None) -> int:
    """Load, serve on ``config.host:config.port`` until SIGINT/SIGTERM (or ``stop``), drain, exit 0."""

    check_port_free(config.host, config.port)
    served = config.served_models()
    print(f"rmserve: loading {len(served)} model(s) in this process (runtime inprocess, no Ray)", flush=True)
    app = build_inprocess_app(config)
    server = _DrainingServer(
        uvicorn.Config(
            app.http,
            host=config.host,
            port=config.port,
            log_level="warning",
            access_log=config.access_log,
            timeout_graceful_shutdown=int(config.limits.request_timeout_s) + 1,
        ),
        app.drain,
    )
    # uvicorn takes SIGINT/SIGTERM while it serves and, once it has shut down gracefully, raises the signal again for
    # the handlers that were there before: these set ``stop``, so the process ends with exit code 0, not the signal's.
    stop = install_stop_signals(stop)
    threading.Thread(target=lambda: (stop.wait(), server.handle_exit(signal.SIGTERM, None)), daemon=True).start()
    url = f"http://{config.host}:{config.port}"
    what = ", ".join(repr(m.path) if m.name is None else f"{m.name}={m.path}" for m in served)
    print(f"rmserve: serving {what} at {url} (GET {url}/ready; Ctrl-C to stop)", flush=True)
    try:
        server.run()
    finally:
        app.close()
    print("rmserve: stopped", flush=True)
    return 0


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, whose shutdown signal first turns the drain on: a request that still reaches the app (on a
    kept-alive connection) gets 503 ``not_ready`` while the accepted ones finish."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.drain.draining:
            print("rmserve: shutting down (new requests get 503; requests in flight finish)", flush=True)
        self.drain.draining = True
        super().handle_exit(sig, frame)


def _gpus() -> int:
    with contextlib.suppress(Exception):
        import torch

        return torch.cuda.device_count()
    return 0
