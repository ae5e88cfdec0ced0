"""The ``Gateway`` deployment: the FastAPI ingress in front of the Scorers (one per served model).

It holds a ``DeploymentHandle`` to each model's Scorer (the first model's is ``scorer``) and builds its
FastAPI app on the replica (``__serve_build_asgi_app__``), so the app's routes, limits and API keys come from
the config object the deployment was bound with. It also records reward telemetry (``telemetry``), reports its
HTTP metrics and telemetry to the application's ``MetricsHub`` deployment, answers ``GET /metrics`` with the
totals of all replicas (``metrics_hub``), and follows ``rmserve serve``'s graceful shutdown (``lifecycle``).
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI
from ray import serve

from rmserve.serve.config.settings import ServerConfig
from rmserve.serve.edge.drain import Drain
from rmserve.serve.edge.routes import create_http_app
from rmserve.serve.edge.service import GatewayService
from rmserve.serve.metrics.telemetry import RewardTelemetry
from rmserve.serve.rayserve.coalescing import splits_by_prefix
from rmserve.serve.rayserve.lifecycle import start_following
from rmserve.serve.rayserve.link import RayLink
from rmserve.serve.rayserve.metrics_hub import ClusterMetrics, HubLink


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway:
    """HTTP front of one rmserve application (see API.md for its routes)."""

    def __init__(self, scorer, config: ServerConfig, more_scorers: Sequence, metrics_hub: HubLink):
        self.config = config
        self.metrics = ClusterMetrics(metrics_hub)
        telemetry = RewardTelemetry(self.metrics.recorder, config.reward_window_items)
        self.metrics.sources.append(telemetry.snapshot)
        handles = (scorer, *more_scorers)
        links = [
            RayLink(handle, config, split_by_prefix=splits_by_prefix(config, model))
            for handle, model in zip(handles, config.served_models(), strict=True)
        ]
        self.service = GatewayService(links, config, telemetry=telemetry)
        self.drain = Drain()
        self._shutdown_follower = start_following(self.drain)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_http_app(self.service, self.config, metrics=self.metrics, drain=self.drain)
