"""What each deployment reserves (CPUs, GPUs), resolved against the machine, checked before anything is deployed,
and the torch thread pool that goes with a Scorer replica's CPUs.

``num_cpus: auto`` gives each Scorer replica the largest Ray node's CPUs minus what the Gateways reserve, shared
among the replicas; ``num_gpus: auto`` gives each replica one GPU when the node has one, else none. Ray sets a
replica's ``OMP_NUM_THREADS`` to its whole CPUs (1 for a fraction), so the Scorer sizes torch's pool itself
(``use_cores``): the replica's CPUs rounded up, at most the cores this process may run on.

Example::

    capacity = Capacity(cpus=2, gpus=0)
    config = resolve_resources(ServerConfig(), capacity)     # num_cpus 1.75 (2 - the Gateway's 0.25), num_gpus 0
    check_fits(config.model_copy(update={"num_cpus": 2.0}), capacity)   # ResourceError: asks 2.25 CPUs, has 2
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rmserve.model.host import host_cores
from rmserve.serve.config.settings import ServerConfig


class ResourceError(RuntimeError):
    """The application asks for more CPUs or GPUs than the Ray instance has (the message says both)."""


@dataclass(frozen=True)
class Capacity:
    """What a Ray instance offers: in total, and on its largest node (one replica must fit on one node)."""

    cpus: float
    gpus: float
    node_cpus: float | None = None
    node_gpus: float | None = None

    @property
    def largest_node_cpus(self) -> float:
        return self.cpus if self.node_cpus is None else self.node_cpus

    @property
    def largest_node_gpus(self) -> float:
        return self.gpus if self.node_gpus is None else self.node_gpus


def ray_capacity() -> Capacity:
    """The running Ray instance's CPUs and GPUs (call after ``ray.init``)."""
    import ray

    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    total = ray.cluster_resources()
    return Capacity(
        cpus=total.get("CPU", 0.0),
        gpus=total.get("GPU", 0.0),
        node_cpus=max((n.get("CPU", 0.0) for n in nodes), default=0.0),
        node_gpus=max((n.get("GPU", 0.0) for n in nodes), default=0.0),
    )


def resolve_resources(config: ServerConfig, capacity: Capacity) -> ServerConfig:
    """``config`` with every ``num_cpus``/``num_gpus`` of ``auto`` (top level and per model) replaced by what
    ``capacity`` allows; automatic CPUs are what the Gateways and the models with explicit CPUs leave, shared
    evenly among the replicas of the other models."""
    served = config.served_models()
    gpus = 1.0 if capacity.largest_node_gpus >= 1 else 0.0
    explicit = sum(m.replicas * float(m.num_cpus) for m in served if m.num_cpus != "auto")
    auto_replicas = sum(m.replicas for m in served if m.num_cpus == "auto")
    spare = capacity.largest_node_cpus - config.gateway_replicas * config.gateway_num_cpus - explicit
    # Rounded down to 1/100 CPU so the sum never exceeds what exists; at least a sliver, so the check below
    # reports a machine too small for the Gateways rather than a negative reservation.
    cpus = max(math.floor(100 * spare / max(auto_replicas, 1)) / 100, 0.01)
    update: dict[str, object] = {}
    if config.num_gpus == "auto":
        update["num_gpus"] = gpus
    if config.num_cpus == "auto":
        update["num_cpus"] = cpus
    if config.models:
        update["models"] = [
            entry.model_copy(
                update={
                    **({"num_gpus": gpus} if entry.num_gpus == "auto" else {}),
                    **({"num_cpus": cpus} if entry.num_cpus == "auto" else {}),
                }
            )
            for entry in config.models
        ]
    return config.model_copy(update=update) if update else config


def check_fits(config: ServerConfig, capacity: Capacity) -> None:
    """Raise ``ResourceError`` when the deployments' reservations cannot all be placed (Ray would wait forever)."""
    config = resolve_resources(config, capacity)
    served = config.served_models()
    need_cpus = config.gateway_replicas * config.gateway_num_cpus
    need_gpus = 0.0
    parts = []
    for model in served:
        cpus, gpus = float(model.num_cpus), float(model.num_gpus)
        need_cpus += model.replicas * cpus
        need_gpus += model.replicas * gpus
        label = "Scorer" if len(served) == 1 else f"Scorer {model.name}"
        parts.append(f"{label}: {model.replicas} replica(s) x {_n(cpus)} CPUs, {_n(gpus)} GPUs")
    too_big = (
        need_cpus > capacity.cpus + 1e-9
        or need_gpus > capacity.gpus + 1e-9
        or any(float(m.num_cpus) > capacity.largest_node_cpus + 1e-9 for m in served)
        or any(float(m.num_gpus) > capacity.largest_node_gpus + 1e-9 for m in served)
    )
    if too_big:
        raise ResourceError(
            f"the application asks for {_n(need_cpus)} CPUs and {_n(need_gpus)} GPUs ({'; '.join(parts)}; Gateway: "
            f"{config.gateway_replicas} replica(s) x {_n(config.gateway_num_cpus)} CPUs), but Ray has "
            f"{_n(capacity.cpus)} CPUs and {_n(capacity.gpus)} GPUs; lower --num-cpus/--num-gpus (auto fits them to "
            "the machine) or raise --ray-num-cpus"
        )


def torch_threads(num_cpus: float | str) -> int:
    """Threads for a replica that reserves ``num_cpus``: rounded up, at least 1, at most the cores available."""
    if num_cpus == "auto":
        return host_cores()
    return max(1, min(math.ceil(round(float(num_cpus), 2)), host_cores()))


def use_cores(num_cpus: float | str) -> int:
    """Size torch's intra-op thread pool to the replica's CPUs (Ray's OMP_NUM_THREADS would give it one)."""
    import torch

    threads = torch_threads(num_cpus)
    torch.set_num_threads(threads)
    return threads


def _n(value: float) -> str:
    return f"{value:g}"
