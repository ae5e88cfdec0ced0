"""``build_app(config)``: the rmserve Ray Serve application (Gateway → Scorer, and their ``MetricsHub``), ready for
``serve.run``.

From Python::

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_app(ServerConfig()), name="rmserve", route_prefix="/")

From a Ray Serve config file (``serve run`` / ``serve deploy``); ``args`` are ``ServerConfig`` fields
and ``RMSERVE_*`` environment variables of the process that builds the app override them::

    applications:
      - name: rmserve
        route_prefix: /
        import_path: rmserve.serve.app:app_builder
        args: {model: {path: demo}, batching: {max_batch_tokens: 16384}}

A trainer in the same Ray cluster then calls the Scorer directly::

    handle = serve.get_deployment_handle("Scorer", app_name="rmserve")
    rewards = await handle.score.remote([{"prompt": "2+2?", "response": "4"}])   # or .remote(...).result()
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from rmserve.model.host import host_cores
from rmserve.serve.config.loading import load_config
from rmserve.serve.config.resources import Capacity, ray_capacity, resolve_resources
from rmserve.serve.config.settings import RoutingConfig, ServerConfig
from rmserve.serve.rayserve.affinity import PrefixAffinityRouter
from rmserve.serve.rayserve.autoscaling import serve_autoscaling_config
from rmserve.serve.rayserve.gateway import Gateway
from rmserve.serve.rayserve.metrics_hub import bind_hub
from rmserve.serve.rayserve.scorer import Scorer, scorer_deployment_name
from rmserve.serve.routing.ensemble import check_ensemble_members

# A replica whose constructor fails (e.g. a checkpoint without weights) is retried this often, not Ray's 20 times.
CONSTRUCTOR_RETRIES = 3
# Requests a Scorer replica accepts beyond its item queue, so overflow reaches it and gets a quick 429
# instead of waiting in Ray's router.
OVERFLOW_REQUESTS = 256


def build_app(config: ServerConfig | Mapping[str, Any] | None = None) -> Application:
    """The application: a Gateway (FastAPI ingress) bound to one Scorer deployment per served model, and the
    ``MetricsHub`` deployment all of them report to (``GET /metrics``).

    Refuses (``ConfigError``) an ensemble whose member's checkpoint and config give no normalisation statistics.
    """
    if not isinstance(config, ServerConfig):
        config = load_config(base=config or {})
    config = resolve_resources(config, _capacity())
    scorer_requests = config.limits.max_queued_items + OVERFLOW_REQUESTS
    # In-flight requests end by their deadline (the Gateway cancels them), so shutdown never waits longer; both
    # deployments log requests (or not) alike.
    common = {
        "graceful_shutdown_timeout_s": config.limits.request_timeout_s + 1,
        "graceful_shutdown_wait_loop_s": 0.5,
        "logging_config": {"enable_access_log": config.access_log},
    }
    check_ensemble_members(config)
    served = config.served_models()
    # The application's metrics collector: it lives and goes with the application, placed with the Gateway.
    metrics_hub = bind_hub(config.gateway_resources)
    scorers = [
        Scorer.options(
            name=scorer_deployment_name(config, index),
            **_replicas(config, model.replicas),
            ray_actor_options={"num_cpus": model.num_cpus, "num_gpus": model.num_gpus, "resources": model.resources},
            max_ongoing_requests=scorer_requests,
            user_config=config.scorer_user_config(),
            max_constructor_retry_count=CONSTRUCTOR_RETRIES,
            **_router(config.routing),
            **common,
        ).bind(config, index, metrics_hub)
        for index, model in enumerate(served)
    ]
    return Gateway.options(
        num_replicas=config.gateway_replicas,
        ray_actor_options={"num_cpus": config.gateway_num_cpus, "resources": config.gateway_resources},
        max_ongoing_requests=scorer_requests * sum(model.replicas for model in served),
        **common,
    ).bind(scorers[0], config, scorers[1:], metrics_hub)


def _replicas(config: ServerConfig, replicas: int) -> dict[str, Any]:
    """A Scorer deployment's fixed replica count, or its autoscaling on the items it holds."""
    if config.autoscaling is None:
        return {"num_replicas": replicas}
    return {"autoscaling_config": serve_autoscaling_config(config.autoscaling)}


def _router(routing: RoutingConfig) -> dict[str, Any]:
    """Scorer deployment options for ``routing`` (nothing for Serve's default router)."""
    if routing.policy != "prefix_affinity":
        return {}
    kwargs = {"imbalance_items": routing.imbalance_items}
    config = RequestRouterConfig(request_router_class=PrefixAffinityRouter, request_router_kwargs=kwargs)
    return {"request_router_config": config}


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for a Ray Serve config file's ``import_path`` (``args`` < ``RMSERVE_*`` environment)."""
    return build_app(load_config(base=args, environ=os.environ))


def _capacity() -> Capacity:
    """The Ray instance's CPUs and GPUs; this host's cores when Ray is not initialised here (e.g. a config check)."""
    import ray

    return ray_capacity() if ray.is_initialized() else Capacity(cpus=host_cores(), gpus=0)
