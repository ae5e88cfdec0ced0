"""Starting the local Ray instance a test module shares (``serve_harness``, ``reliability_harness``)."""

from __future__ import annotations


def start_local_ray(cpus: int, attempts: int = 3) -> None:
    """``ray.init`` of a fresh local instance, started again when a head process does not come up in time, as seen
    in full runs on 2 busy cores: the raylet never registers (Ray's "The current node timed out during startup", and
    no raylet log at all), or the GCS server never writes its port ("Timed out waiting for file ...gcs_server_port")."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception as exc:
            if "timed out" not in str(exc).lower() or attempt == attempts:
                raise
            ray.shutdown()
