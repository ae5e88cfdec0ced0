"""The ``Gateway`` deployment: the FastAPI ingress in front of the Scorer.

It holds a ``DeploymentHandle`` to the Scorer and builds its FastAPI app on the replica
(``__serve_build_asgi_app__``), so the app's routes, limits and API keys come from the config
object the deployment was bound with. It also reports its HTTP metrics to the application's
metrics hub and answers ``GET /metrics`` with the totals of all replicas (``metrics_hub``), and
follows ``rmserve serve``'s graceful shutdown (``lifecycle``).
"""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve

from .compat import CompatService
from .config import ServerConfig
from .lifecycle import Drain, start_following
from .metrics_hub import ClusterMetrics
from .routes import create_http_app
from .service import GatewayService


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway:
    """HTTP front of one rmserve application (see API.md for its routes)."""

    def __init__(self, scorer, config: ServerConfig):
        self.config = config
        self.service = GatewayService(scorer, config)
        self.compat = CompatService(self.service, config)
        self.metrics = ClusterMetrics()
        self.drain = Drain()
        self._shutdown_follower = start_following(self.drain)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_http_app(self.service, self.config, compat=self.compat, metrics=self.metrics, drain=self.drain)
