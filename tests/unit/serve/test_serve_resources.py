"""CPUs and GPUs per deployment: ``auto`` resolved against the machine, requests it cannot hold refused with what was
asked and what exists, and torch's threads sized to a replica's CPUs."""

from __future__ import annotations

import pytest

from rmserve.model.host import host_cores
from rmserve.serve.config.loading import load_config
from rmserve.serve.config.resources import (
    Capacity,
    ResourceError,
    check_fits,
    resolve_resources,
    torch_threads,
)
from rmserve.serve.config.settings import ServerConfig


def test_auto_gives_the_scorer_the_cores_the_gateway_leaves():
    config = resolve_resources(ServerConfig(), Capacity(cpus=2, gpus=0))
    assert (config.num_cpus, config.num_gpus) == (1.75, 0.0)
    check_fits(config, Capacity(cpus=2, gpus=0))


def test_auto_shares_the_cores_among_replicas_and_takes_one_gpu_each_where_there_are_gpus():
    config = resolve_resources(ServerConfig(replicas=2), Capacity(cpus=16, gpus=2))
    assert (config.num_cpus, config.num_gpus) == (7.87, 1.0)
    check_fits(config, Capacity(cpus=16, gpus=2))


def test_explicit_values_are_kept():
    config = resolve_resources(ServerConfig(num_cpus=3, num_gpus=0.5), Capacity(cpus=64, gpus=8))
    assert (config.num_cpus, config.num_gpus) == (3.0, 0.5)


def test_a_request_the_machine_cannot_hold_says_what_was_asked_and_what_exists():
    with pytest.raises(ResourceError) as info:
        check_fits(ServerConfig(num_cpus=2, num_gpus=0), Capacity(cpus=2, gpus=0))
    message = str(info.value)
    assert "asks for 2.25 CPUs and 0 GPUs" in message and "Ray has 2 CPUs and 0 GPUs" in message
    assert "1 replica(s) x 2 CPUs" in message and "--num-cpus" in message


def test_gpus_that_do_not_exist_are_refused():
    with pytest.raises(ResourceError, match="asks for 1 CPUs and 2 GPUs"):
        check_fits(ServerConfig(replicas=2, num_cpus=0.375, num_gpus=1), Capacity(cpus=8, gpus=1))


def test_a_replica_must_fit_on_one_node():
    with pytest.raises(ResourceError):
        check_fits(ServerConfig(num_cpus=6), Capacity(cpus=16, gpus=0, node_cpus=4, node_gpus=0))


def test_torch_threads_follow_the_replicas_cpus_within_the_cores_there_are():
    assert torch_threads(0.5) == 1
    assert torch_threads(1) == 1
    assert torch_threads(1.75) == min(2, host_cores())
    assert torch_threads(10_000) == host_cores()
    assert torch_threads("auto") == host_cores()


def test_host_cores_respect_a_containers_cpu_quota(monkeypatch, tmp_path):
    """A container with a CPU limit sees every core of its node in its affinity; its quota (cgroup v2 ``cpu.max``, or
    v1's quota and period) caps the cores, rounded down, at least 1 ("max" or a quota of -1: no limit)."""
    import os

    from rmserve.model import host

    affinity = len(os.sched_getaffinity(0))
    cpu_max, quota, period = tmp_path / "cpu.max", tmp_path / "cpu.cfs_quota_us", tmp_path / "cpu.cfs_period_us"
    monkeypatch.setattr(host, "CGROUP_CPU_MAX", str(cpu_max))
    monkeypatch.setattr(host, "CGROUP_V1_CPU_QUOTA", (str(quota), str(period)))
    assert host_cores() == affinity  # no cgroup files: no container limit
    cpu_max.write_text("max 100000\n")
    assert host_cores() == affinity
    cpu_max.write_text("50000 100000\n")  # half a CPU
    assert host_cores() == 1 and torch_threads("auto") == 1 and torch_threads(4) == 1
    cpu_max.write_text(f"{(affinity + 8) * 100000} 100000\n")  # a quota above the cores there are
    assert host_cores() == affinity
    cpu_max.unlink()
    quota.write_text("-1\n")  # cgroup v1, no limit
    period.write_text("100000\n")
    assert host_cores() == affinity
    quota.write_text("150000\n")  # 1.5 CPUs
    assert host_cores() == 1
    assert host.cgroup_cpu_quota() == pytest.approx(1.5)


def test_auto_is_the_default_and_every_source_can_set_it():
    assert (ServerConfig().num_cpus, ServerConfig().num_gpus) == ("auto", "auto")
    config = load_config(environ={"RMSERVE_NUM_CPUS": "3", "RMSERVE_NUM_GPUS": "auto"})
    assert (config.num_cpus, config.num_gpus) == (3.0, "auto")
    assert load_config(overrides={"num_cpus": "auto"}).num_cpus == "auto"
    with pytest.raises(ValueError, match="num_cpus"):
        load_config(overrides={"num_cpus": "lots"})


def test_custom_resources_place_the_scorers_and_the_gateway_from_every_source():
    environ = {"RMSERVE_RESOURCES": '{"rmserve_scorer": 1}', "RMSERVE_GATEWAY_RESOURCES": '{"rmserve_gateway": 0.5}'}
    config = load_config(base={"resources": {"rmserve_scorer": 2, "gpu_node": 1}}, environ=environ)
    assert config.resources == {"rmserve_scorer": 1.0, "gpu_node": 1.0}  # merged key by key, as every mapping
    assert config.gateway_resources == {"rmserve_gateway": 0.5}
    assert config.served_models()[0].resources == {"rmserve_scorer": 1.0, "gpu_node": 1.0}
    several = load_config(
        base={
            "resources": {"gpu_node": 1},
            "models": [{"name": "a", "path": "/a"}, {"name": "b", "path": "/b", "resources": {"big": 1}}],
        }
    )
    assert [m.resources for m in several.served_models()] == [{"gpu_node": 1.0}, {"big": 1.0}]
    assert load_config(environ={"RMSERVE_RESOURCES": "rmserve_scorer=1"}).resources == {"rmserve_scorer": 1.0}
    with pytest.raises(ValueError, match="RMSERVE_RESOURCES must be a JSON object or key=value pairs"):
        load_config(environ={"RMSERVE_RESOURCES": "rmserve_scorer"})
    with pytest.raises(ValueError, match="resources"):
        load_config(overrides={"resources": {"rmserve_scorer": -1}})


def test_the_app_reserves_the_custom_resources_next_to_cpus_and_gpus():
    """The builder's ray_actor_options carry them (a config file's `deployments: ray_actor_options` would replace the
    whole dict, num_cpus and num_gpus included, so rmserve's own settings are the way to set them)."""
    from rmserve.serve.app import build_app

    config = {"model": {"path": "/ckpt"}, "num_cpus": 1, "num_gpus": 0, "resources": {"rmserve_scorer": 1}}
    gateway = build_app({**config, "gateway_resources": {"rmserve_gateway": 1}})._bound_deployment
    scorer = gateway.init_args[0]._bound_deployment
    assert gateway.ray_actor_options == {"num_cpus": 0.25, "resources": {"rmserve_gateway": 1.0}}
    assert scorer.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": {"rmserve_scorer": 1.0}}
    hub = gateway.init_args[3].hub._bound_deployment  # the metrics collector goes with the Gateway
    assert hub.ray_actor_options == {"num_cpus": 0, "resources": {"rmserve_gateway": 1.0}}
