"""Run the application in a local Ray instance until SIGINT/SIGTERM: what ``rmserve serve`` does.

Example::

    run_until_signalled(ServerConfig(port=8000))   # blocks; returns 0 after Ctrl-C or SIGTERM
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from rmserve.serve.cli.process import StartupError, check_port_free, free_port, install_stop_signals
from rmserve.serve.config.settings import ServerConfig

log = logging.getLogger("rmserve.serve")
# After the last accepted request was answered, its response still travels Gateway -> proxy -> client.
DRAIN_GRACE_S = 0.5

# Ray Serve settings for a server whose cost is per request (one short item each, from many trainer workers):
# user code and the handle router on the replica's own event loop instead of extra threads and loops, handle
# calls over gRPC (without its 4 MiB message limit). Measured with benchmarks/ (README there). Not Ray's buffered
# request log (RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE): it holds every record below ERROR, warnings included, until
# 1,000 have piled up. A value already in the environment wins.
THROUGHPUT_ENVIRONMENT = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    # gRPC's default 4 MiB message limit would fail any request body over 4 MiB (limits.max_body_bytes is 32 MiB
    # by default, and the Gateway merges requests): gRPC's own maximum instead.
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**31 - 1),
}


def ray_environment(config: ServerConfig) -> dict[str, str]:
    """The Ray Serve environment variables ``rmserve serve`` starts Ray with.

    With direct ingress the Gateway replica's own HTTP server listens on ``host:port`` (Ray allocates direct
    ingress ports from a range: ours is that one port) and Ray's proxy moves to a free loopback port nobody is told
    about. rmserve drains its Gateways itself (``lifecycle``), so Ray's 30 s load-balancer draining period and its
    150 s port quarantine (both for HAProxy fleets) are off.
    """
    env = dict(THROUGHPUT_ENVIRONMENT, RAY_SERVE_ENABLE_DIRECT_INGRESS="0")
    if config.uses_direct_ingress():
        env.update(
            RAY_SERVE_ENABLE_DIRECT_INGRESS="1",
            RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(config.port),
            RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(config.port + 1),  # Ray's range excludes its maximum
            RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="0",
            RAY_SERVE_PORT_QUARANTINE_S="0",
        )
    return env


def export_environment(env: dict[str, str]) -> None:
    """Put ``env`` into this process's environment before Ray starts (its processes inherit it); a variable that
    is already set keeps its value, so an operator can override any of them."""
    for name, value in env.items():
        os.environ.setdefault(name, value)


def run_until_signalled(config: ServerConfig, stop: threading.Event | None = None) -> int:
    """Start local Ray (dashboard off unless asked), deploy, print the URL, wait for a signal, shut down.

    A resource request the Ray instance cannot hold fails before anything is deployed (``StartupError`` saying what
    was asked and what exists). SIGINT/SIGTERM stop the server in every state: while it starts, the deployment is
    abandoned and Ray shut down; once it serves, shutting down is graceful: the Gateways refuse new requests with
    503 while the ones they accepted finish (at most the request deadline), then Serve and Ray stop (``lifecycle``).
    """
    check_port_free(config.host, config.port)
    export_environment(ray_environment(config))
    direct = os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    stop = stop or threading.Event()

    import ray
    from ray import serve

    from rmserve.serve.app import build_app
    from rmserve.serve.config.resources import ResourceError, check_fits, ray_capacity, resolve_resources
    from rmserve.serve.rayserve.lifecycle import drain, start_coordinator

    install_stop_signals(stop)  # before ray.init: a signal while Ray starts ends in a clean shutdown too
    ray.init(address="local", num_cpus=config.ray_num_cpus, include_dashboard=config.ray_dashboard)
    install_stop_signals(stop)  # again: ray.init installs its own SIGTERM handling (an abort in the driver)
    deployed = False
    try:
        capacity = ray_capacity()
        config = resolve_resources(config, capacity)
        try:
            check_fits(config, capacity)
        except ResourceError as exc:
            raise StartupError(str(exc)) from None
        served = config.served_models()
        scorers = "; ".join(
            f"Scorer{'' if len(served) == 1 else ' ' + str(m.name)}: {m.replicas} x {float(m.num_cpus):g} CPUs, "
            f"{float(m.num_gpus):g} GPUs"
            for m in served
        )
        print(f"rmserve: deploying ({scorers})", flush=True)
        proxy_port = free_port(config.host) if direct else config.port
        started = _in_background(lambda: _deploy(config, proxy_port, build_app, start_coordinator))
        while not started.done.wait(0.2):
            if stop.is_set():
                print("rmserve: stopped while starting; shutting down", flush=True)
                return 0
        coordinator = started.result()
        deployed = True
        url = f"http://{config.host}:{config.port}"
        what = ", ".join(repr(m.path) if m.name is None else f"{m.name}={m.path}" for m in served)
        print(f"rmserve: serving {what} at {url} (GET {url}/ready; Ctrl-C to stop)", flush=True)
        while not stop.wait(0.5):
            pass
        print("rmserve: shutting down (new requests get 503; requests in flight finish)", flush=True)
        try:
            gateways = drain(coordinator, timeout_s=config.limits.request_timeout_s + 1)
        except Exception as exc:  # the drain is best effort: shutting down must not fail because of it
            log.warning("could not drain the Gateways before shutting down: %r", exc)
        else:
            if not all(gateways.values()):
                log.warning("shutting down with requests in flight on %s", [g for g, d in gateways.items() if not d])
            time.sleep(DRAIN_GRACE_S)
    finally:
        try:
            if deployed:  # a deployment still starting may hold serve.shutdown up; ray.shutdown ends it all
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0


def _deploy(config: ServerConfig, proxy_port: int, build_app: Any, start_coordinator: Any) -> Any:
    """Start Serve and deploy the application (blocks until it runs); returns the shutdown coordinator."""
    from ray import serve

    try:
        serve.start(http_options={"host": config.host, "port": proxy_port})
        coordinator = start_coordinator(config.app_name)  # before the Gateways start: they look it up
        serve.run(build_app(config), name=config.app_name, route_prefix="/")
    except Exception as exc:
        cause = _deployment_failure(config.app_name) or _root_cause(exc)
        raise StartupError(f"the application failed to start: {cause}") from None
    return coordinator


class _Background:
    """The outcome of a function run on a daemon thread (so the main thread can keep watching for signals)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def _in_background(fn: Any) -> _Background:
    outcome = _Background()

    def run() -> None:
        try:
            outcome.value = fn()
        except BaseException as exc:
            outcome.error = exc
        finally:
            outcome.done.set()

    threading.Thread(target=run, name="rmserve-deploy", daemon=True).start()
    return outcome


def _deployment_failure(app_name: str) -> str | None:
    """The cause Serve recorded for a deployment that failed (e.g. the Scorer's ModelLoadError), if any."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # Serve itself may be what failed
        return None
    for name, deployment in (app.deployments if app else {}).items():
        if deployment.message and "Error" in deployment.message:
            return f"{name}: {_root_cause(RuntimeError(deployment.message))}"
    return None


def _root_cause(exc: BaseException) -> str:
    """The most specific line of a Ray deployment failure (its tracebacks run to hundreds of lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error:" in line or "Exception:" in line:
            return line
    return lines[-1] if lines else type(exc).__name__
