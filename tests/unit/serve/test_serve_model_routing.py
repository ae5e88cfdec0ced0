"""Which served model or ensemble a request's ``model`` names (no Ray: links and handles are plain objects)."""

from __future__ import annotations

import os

from rmserve.serve.config.settings import ServerConfig
from rmserve.serve.routing.model_routing import EnsembleRoute, ModelRouter


def router(tmp_path) -> ModelRouter:
    (tmp_path / "a").mkdir()
    config = ServerConfig.model_validate(
        {
            "models": [
                {"name": "helpful", "path": str(tmp_path / "a")},
                {"name": "safe", "path": "/ckpt/b", "served_model_names": ["safety", "org/safe"], "replicas": 2},
            ],
            "ensembles": [{"name": "both", "members": {"safe": 1.0, "helpful": 2.0}}],
        }
    )
    return ModelRouter(["handle-a", "handle-b"], config)


def test_absent_means_the_first_model_and_every_name_finds_its_model(tmp_path):
    r = router(tmp_path)
    helpful, safe = r.lanes
    assert (helpful.link, safe.link) == ("handle-a", "handle-b")
    assert r.find(None) is helpful
    for name in ("helpful", str(tmp_path / "a"), str(tmp_path / "a") + "/", os.path.realpath(tmp_path / "a")):
        assert r.find(name) is helpful, name
    for name in ("safe", "safety", "org/safe", "/ckpt/b", "/ckpt/b/", "/ckpt/./b"):
        assert r.find(name) is safe, name
    assert r.find("nope") is None and r.find("/ckpt") is None


def test_an_ensemble_is_found_by_name_with_its_members_lanes(tmp_path):
    r = router(tmp_path)
    both = r.find("both")
    assert isinstance(both, EnsembleRoute) and both.name == "both"
    assert both.lanes == [r.lanes[1], r.lanes[0]]  # in members order
    assert "both" in r.all_names() and "safety" in r.all_names()


def test_each_ray_link_has_its_own_coalescer_on_its_own_scorer():
    from rmserve.serve.rayserve.link import RayLink

    config = ServerConfig()
    helpful, safe = RayLink("handle-a", config), RayLink("handle-b", config)
    assert helpful.coalescer is not safe.coalescer
    assert (helpful.coalescer.scorer, safe.coalescer.scorer) == ("handle-a", "handle-b")


def test_a_single_unnamed_model_learns_its_id_from_its_card():
    r = ModelRouter(["handle"], ServerConfig.model_validate({"model": {"path": "demo"}, "served_model_names": ["rm"]}))
    (lane,) = r.unknown_lanes()
    assert r.find("rmserve-demo") is None and r.find("rm") is lane
    lane.learn({"id": "rmserve-demo"})
    assert r.find("rmserve-demo") is lane and not r.unknown_lanes()
    assert lane.names == ["rmserve-demo", "rm", "demo"]
