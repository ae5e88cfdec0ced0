"""The deployment files parse with Ray Serve's own schema and name a real app builder with valid args."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rmserve.serve.config.loading import load_config
from rmserve.serve.rayserve.server import THROUGHPUT_ENVIRONMENT

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"


def _serve_configs():
    plain = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    rayservice = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    return {"serve_config.yaml": plain, "rayservice.yaml": yaml.safe_load(rayservice["spec"]["serveConfigV2"])}


@pytest.mark.parametrize("name", ["serve_config.yaml", "rayservice.yaml"])
def test_serve_config_matches_ray_schema(name):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(_serve_configs()[name])
    (app,) = schema.applications
    assert app.import_path == "rmserve.serve.app:app_builder"
    config = load_config(base=app.args)  # the args are a valid ServerConfig
    assert config.num_gpus == 1 and config.model.path.startswith("/models/")
    # Scorer autoscaling is rmserve's (held items), not a Serve override that would replace it.
    assert all(d.name != "Scorer" or d.autoscaling_config is None for d in app.deployments)
    auto = config.autoscaling
    assert auto.min_replicas >= 1 and auto.max_replicas > auto.min_replicas and auto.target_queued_items > 0
    assert config.routing.policy == "prefix_affinity"


def test_rayservice_wires_readiness_and_api_key_secret():
    doc = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    assert doc["kind"] == "RayService" and doc["apiVersion"] == "ray.io/v1"
    cluster = doc["spec"]["rayClusterConfig"]
    workers = cluster["workerGroupSpecs"]
    assert any(
        c["resources"]["limits"].get("nvidia.com/gpu") for w in workers for c in w["template"]["spec"]["containers"]
    )
    containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        c for w in workers for c in w["template"]["spec"]["containers"]
    ]
    for c in containers:
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
        key_env = next(e for e in c["env"] if e["name"] == "RMSERVE_API_KEYS")
        assert "secretKeyRef" in key_env["valueFrom"] and "value" not in key_env
        # Every Ray process (proxy, controller, replicas) runs with the Ray Serve settings `rmserve serve` uses.
        ray_env = {e["name"]: e["value"] for e in c["env"] if e["name"].startswith("RAY_SERVE_")}
        assert ray_env == THROUGHPUT_ENVIRONMENT


def test_dockerfile_is_non_root_with_healthcheck():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "FROM nvidia/cuda:" in text
    assert "\nUSER rmserve" in text and "HEALTHCHECK" in text and "/health" in text
