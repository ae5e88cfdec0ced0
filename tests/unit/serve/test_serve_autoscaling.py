"""Autoscaling on the items Scorer replicas hold: the policy Serve calls, and the deployment options build_app sets."""

from __future__ import annotations

import pytest
from ray.serve.config import AutoscalingContext

from rmserve.serve import build_app
from rmserve.serve.config.loading import ConfigError, load_config
from rmserve.serve.rayserve.autoscaling import QUEUED_ITEMS, QueuedItemsPolicy


def context(held: dict[str, float] | None, replicas: int = 2, target: int = 2) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=None,
        deployment_name="Scorer",
        app_name="rmserve",
        current_num_replicas=replicas,
        target_num_replicas=target,
        running_replicas=[],
        total_num_requests=3.0,  # merged calls: not what the policy reads
        total_queued_requests=0.0,
        aggregated_metrics={QUEUED_ITEMS: held} if held is not None else {},
        raw_metrics={},
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=4,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=0.0,
        config=None,
    )


def test_the_policy_asks_for_the_items_held_over_the_target_per_replica():
    policy = QueuedItemsPolicy(target_queued_items=100)
    assert policy(context({"r1": 180.0, "r2": 120.0}))[0] == pytest.approx(3.0)
    assert policy(context({"r1": 10.0, "r2": 0.0}))[0] == pytest.approx(0.1)  # Serve raises it to min_replicas
    assert policy(context(None, target=2))[0] == 2  # nothing reported yet: keep the target


def test_build_app_scales_every_scorer_on_held_items_with_prefix_affinity_routing():
    config = load_config(
        base={"model": {"path": "demo"}, "num_cpus": 1, "autoscaling": {"max_replicas": 3, "target_queued_items": 64}}
    )
    assert [m.replicas for m in config.served_models()] == [3]  # resources are sized for the most replicas
    scorer = build_app(config)._bound_deployment.init_args[0]._bound_deployment
    auto = scorer._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas) == (1, 3)
    assert isinstance(auto.policy.get_policy()(target_queued_items=64), QueuedItemsPolicy)
    assert auto.policy.policy_kwargs == {"target_queued_items": 64}
    assert scorer._deployment_config.request_router_config.request_router_class.endswith("PrefixAffinityRouter")


def test_autoscaling_settings_are_checked_and_reachable_from_the_environment():
    with pytest.raises(ConfigError, match="min_replicas"):
        load_config(base={"autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    config = load_config(base={}, environ={"RMSERVE_AUTOSCALING__MAX_REPLICAS": "2"})
    assert (config.autoscaling.min_replicas, config.autoscaling.max_replicas) == (1, 2)
