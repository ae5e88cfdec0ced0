"""A real multi-node Ray cluster on loopback, and rmserve deployed onto it the way an operator deploys it.

Every node is its own ``ray start --block`` process in its own process group, with its own temp dir and ports, so
one node can be killed alone (``kill``: SIGKILL to its group, as when a machine disappears) and nothing touches
another Ray instance on this machine. ``deploy`` runs Ray Serve's own CLI, ``serve run --non-blocking``, on the
checked-in ``deploy/serve_config.yaml``; what a laptop needs (the model, CPUs, placement resources) comes from
``RMSERVE_*`` variables in the environment of every node, as KubeRay passes them to every container. The file's
only edits: loopback with a free port, a single proxy (the nodes share one address), and a fixed ``replicas`` in
place of the file's ``autoscaling`` when a test fixes the replica count.

Example::

    with LoopbackCluster(env=node_environment(model_dir)) as cluster:
        cluster.start_head(num_cpus=1, resources={GATEWAY_RESOURCE: 100})
        worker = cluster.add_worker(num_cpus=1, resources={SCORER_RESOURCE: 1})
        url = cluster.deploy(replicas=1)
        ...
        cluster.kill(worker)
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import yaml

from rmserve.serve.rayserve.server import THROUGHPUT_ENVIRONMENT

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = ROOT / "deploy" / "serve_config.yaml"
APP_NAME = "rmserve"
GATEWAY_RESOURCE = "rmserve_gateway"
SCORER_RESOURCE = "rmserve_scorer"
NODE_START_TIMEOUT_S = 60
START_ATTEMPTS = 2
PR_SET_PDEATHSIG = 1  # linux/prctl.h
DEPLOY_TIMEOUT_S = 300
POLL_S = 0.25
# The GCS declares a node dead after 5 failed health checks; a killed node's replicas are replaced once it is. A check
# of a killed raylet fails at once (connection refused), so a 1 s period finds it within seconds instead of Ray's
# 3 s x 5; the timeout stays Ray's 10 s so a raylet slowed by a loaded machine is not taken for dead.
HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5"}
# Ray's token authentication is for clusters others can reach; this one lives on one machine for one test, and a token
# in ~/.ray is shared with every other Ray instance of this user.
AUTH = {"RAY_AUTH_MODE": "disabled"}

T = TypeVar("T")


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A free loopback port never handed out before in this process: the kernel may give the same free port to two
    binds in a row, and Ray refuses a node whose components were given one port twice."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def wait_for(condition: Callable[[], T], timeout_s: float, what: str, poll_s: float = POLL_S) -> T:
    """Poll ``condition`` until it returns something truthy (returned) or ``timeout_s`` passes (AssertionError)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


def node_environment(model_dir: Path) -> dict[str, str]:
    """The environment of every node: the Ray Serve settings deploy/README.md asks operators to export, and the
    ``RMSERVE_*`` overrides a laptop needs (the demo model in fp32 on CPU, one CPU per Scorer replica, the
    placement resources)."""
    return {
        **THROUGHPUT_ENVIRONMENT,
        "RMSERVE_MODEL__PATH": str(model_dir),
        "RMSERVE_MODEL__DTYPE": "fp32",
        "RMSERVE_MODEL__DEVICE": "cpu",
        "RMSERVE_NUM_GPUS": "0",
        "RMSERVE_NUM_CPUS": "1",
        "RMSERVE_RESOURCES": json.dumps({SCORER_RESOURCE: 1}),
        "RMSERVE_GATEWAY_RESOURCES": json.dumps({GATEWAY_RESOURCE: 1}),
        "OMP_NUM_THREADS": "1",
    }


@contextlib.contextmanager
def head_and_two_workers(
    model_dir: Path, *, replicas: int | None = None, env: Mapping[str, str] | None = None
) -> Iterator[LoopbackCluster]:
    """The tests' cluster: a head for the Gateway and two worker nodes with one Scorer slot each (two replicas cannot
    share a node), rmserve deployed (``replicas`` fixed, or the file's autoscaling), torn down after."""
    with LoopbackCluster(env={**node_environment(model_dir), **(env or {})}) as cluster:
        cluster.start_head(num_cpus=1, resources={GATEWAY_RESOURCE: 100})
        cluster.add_worker("worker-1", num_cpus=1, resources={SCORER_RESOURCE: 1})
        cluster.add_worker("worker-2", num_cpus=1, resources={SCORER_RESOURCE: 1})
        cluster.deploy(replicas=replicas)
        yield cluster


@dataclass
class RayNode:
    """One ``ray start --block`` process (and, in its process group, everything it started)."""

    name: str
    process: subprocess.Popen
    temp_dir: Path
    log: Path
    node_id: str = ""

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class LoopbackCluster:
    """A head and worker nodes on this machine, all under one fresh temp root; ``shutdown`` (or leaving the ``with``
    block) kills every process they started, whatever happened. (``--node-ip-address=127.0.0.1`` is what the nodes
    are given; Ray itself registers them under the machine's address. Serve's HTTP proxy listens on 127.0.0.1.)"""

    env: Mapping[str, str] = field(default_factory=dict)
    object_store_bytes: int = 100 * 1024 * 1024
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rmc-", dir="/tmp")))
    nodes: list[RayNode] = field(default_factory=list)
    gcs_port: int = 0
    url: str = ""  # the app's HTTP address, once deployed
    _connected: bool = False
    _saved_environ: dict[str, str | None] = field(default_factory=dict)

    def __enter__(self) -> LoopbackCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    # --- nodes

    def start_head(self, *, num_cpus: float, resources: Mapping[str, float]) -> RayNode:
        """Start the head (GCS, Serve's controller and proxy go here) and connect this process to it as a driver."""
        self.gcs_port = free_port()
        head = self._start(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                f"--ray-client-server-port={free_port()}",
                "--include-dashboard=false",
            ],
            num_cpus,
            resources,
        )
        wait_for(lambda: self._started(head), NODE_START_TIMEOUT_S, "the head node to start")
        import ray

        for name, value in AUTH.items():  # this process connects as a driver with the cluster's auth mode
            self._saved_environ[name] = os.environ.get(name)
            os.environ[name] = value
        ray.init(address=self.address, log_to_driver=False)
        self._connected = True
        head.node_id = ray.get_runtime_context().get_node_id()
        return head

    def add_worker(self, name: str, *, num_cpus: float, resources: Mapping[str, float]) -> RayNode:
        """Start a worker node and wait until the GCS lists it alive. A second try when ``ray start`` gives up: on a
        loaded 2-core machine its fixed 30 s wait for the raylet to register can pass."""
        for attempt in range(START_ATTEMPTS):
            known = {n["NodeID"] for n in self.alive_nodes()}
            node = self._start(
                f"{name}-{attempt}" if attempt else name, [f"--address={self.address}"], num_cpus, resources
            )

            def registered(node: RayNode = node, known: set = known) -> str | None:
                self._check_running(node)
                new = [n["NodeID"] for n in self.alive_nodes() if n["NodeID"] not in known]
                return new[0] if new else None

            try:
                node.node_id = wait_for(registered, NODE_START_TIMEOUT_S, f"worker node {name} to join")
                node.name = name
                return node
            except AssertionError:
                self.kill(node)
                self.nodes.remove(node)
                if attempt + 1 == START_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def kill(self, node: RayNode) -> None:
        """SIGKILL the node's process group: its raylet, object store and every worker on it vanish at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.process.wait(timeout=30)

    def alive_nodes(self) -> list[dict[str, Any]]:
        import ray

        return [n for n in ray.nodes() if n["Alive"]]

    def node_name(self, node_id: str) -> str:
        return next((n.name for n in self.nodes if n.node_id == node_id), node_id)

    def shutdown(self) -> None:
        """Disconnect, kill every node's process group, then any process still running from this cluster's temp root
        (one that left its group), and remove the temp root."""
        if self._connected:
            import ray
            from ray.serve.context import _set_global_client

            _set_global_client(None)  # else the next cluster's driver (same job id) reuses this controller's handle
            with contextlib.suppress(Exception):
                ray.shutdown()
            self._connected = False
        for name, value in self._saved_environ.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for node in self.nodes:  # a graceful stop drains for up to 30 s; nothing here needs draining
            self.kill(node)
        for proc in self._leftover_processes():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def _start(self, name: str, args: list[str], num_cpus: float, resources: Mapping[str, float]) -> RayNode:
        temp_dir = self.root / name
        temp_dir.mkdir(parents=True)
        log = self.root / f"{name}.log"
        command = [
            str(Path(sys.executable).with_name("ray")),
            "start",
            *args,
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus:g}",
            "--num-gpus=0",
            f"--resources={json.dumps(dict(resources))}",
            f"--temp-dir={temp_dir}",
            f"--object-store-memory={self.object_store_bytes}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            "--include-log-monitor=false",
            "--disable-usage-stats",
        ]
        env = {
            **os.environ,
            **self.env,
            **HEALTH_CHECK,
            **AUTH,
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
        }
        with log.open("w") as out:
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                cwd=self.root,
                preexec_fn=_stop_when_parent_dies,
            )
        node = RayNode(name=name, process=process, temp_dir=temp_dir, log=log)
        self.nodes.append(node)
        return node

    def _started(self, node: RayNode) -> bool:
        self._check_running(node)
        return "Ray runtime started" in node.log_tail(100_000)

    def _check_running(self, node: RayNode) -> None:
        if node.process.poll() is not None:
            raise AssertionError(f"ray start ({node.name}) exited with {node.process.returncode}:\n{node.log_tail()}")

    def _leftover_processes(self) -> list[psutil.Process]:
        root, me = str(self.root), os.getpid()
        found = []
        for proc in psutil.process_iter(["pid", "cmdline", "uids"]):
            with contextlib.suppress(psutil.Error):
                if proc.pid != me and any(root in part for part in proc.info["cmdline"] or []):
                    found.append(proc)
        return found

    # --- rmserve on the cluster

    def deploy(self, *, replicas: int | None = None, timeout_s: float = DEPLOY_TIMEOUT_S) -> str:
        """``serve run --non-blocking`` of deploy/serve_config.yaml (edits in the module docstring; ``replicas``: a
        fixed Scorer replica count in place of the file's ``autoscaling``, as an operator would write it; None keeps
        the file's autoscaling, which the nodes' ``RMSERVE_AUTOSCALING__*`` may tune); returns the URL once
        ``/ready`` answers 200."""
        config = yaml.safe_load(SERVE_CONFIG.read_text())
        http_port = free_port()
        config["http_options"] = {"host": "127.0.0.1", "port": http_port}
        config["proxy_location"] = "HeadOnly"
        (app,) = config["applications"]
        if replicas is not None:
            app["args"].pop("autoscaling", None)
            app["args"]["replicas"] = replicas
        path = self.root / "serve_config.yaml"
        path.write_text(yaml.safe_dump(config))
        serve_cli = Path(sys.executable).with_name("serve")
        env = {**os.environ, **self.env, **AUTH, "RAY_USAGE_STATS_ENABLED": "0"}
        done = subprocess.run(
            [str(serve_cli), "run", "--non-blocking", f"--address={self.address}", str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=self.root,
        )
        assert done.returncode == 0, f"serve run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        url = f"http://127.0.0.1:{http_port}"

        def ready() -> bool:
            status = app_status()
            assert status != "DEPLOY_FAILED", f"the application failed to deploy: {serve_details()}"
            try:
                return status == "RUNNING" and httpx.get(f"{url}/ready", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout_s, "the rmserve application to be RUNNING and ready", poll_s=1.0)
        self.url = url
        return url


def _stop_when_parent_dies() -> None:
    """In the child: SIGTERM when the test process dies, even by SIGKILL (``ray start --block`` then stops its node)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# --- what Serve reports (through the controller, as `serve status` does; the dashboard is off)


def serve_details() -> dict[str, Any]:
    """Serve's instance details (applications, deployments, replicas with their node ids), as a plain dict."""
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


def app_status() -> str | None:
    app = serve_details().get("applications", {}).get(APP_NAME)
    return app["status"] if app else None


def replicas(deployment: str) -> list[dict[str, Any]]:
    """The deployment's replicas: ``{replica_id, state, node_id, actor_id, pid, ...}`` each."""
    app = serve_details().get("applications", {}).get(APP_NAME) or {}
    return list(app.get("deployments", {}).get(deployment, {}).get("replicas", []))


def running_replica_nodes(deployment: str) -> list[str]:
    """Node ids of the deployment's RUNNING replicas (one entry per replica)."""
    return sorted(r["node_id"] for r in replicas(deployment) if r["state"] == "RUNNING")
