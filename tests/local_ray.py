"""Starting the local Ray instance a test module shares (``serve_harness``, ``reliability_harness``)."""

from __future__ import annotations


def start_local_ray(cpus: int, attempts: int = 3) -> None:
    """``ray.init`` of a fresh local instance, started again when its raylet never registers (seen once in a full
    run on 2 busy cores: Ray's "The current node timed out during startup", and no raylet log at all)."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            ray.shutdown()
