"""Start a server as a subprocess on a free loopback port, wait until ``GET /ready`` answers 200, stop it after.

Example::

    with running_server(baseline_command(model_dir, port, "fp32"), port, log_path=Path("baseline.log")) as server:
        ...   # server.url == "http://127.0.0.1:<port>"; server.cpu_seconds() counts its whole process tree
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class RunningServer:
    """A started server: its base URL and the process id whose tree (Ray's processes included) it runs in."""

    url: str
    pid: int

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the server process and all its descendants (Linux)."""
        return sum(_process_cpu_seconds(p) for p in process_tree(self.pid))


class ServerStartError(RuntimeError):
    """The server exited or did not become ready in time (the message ends with its log's tail)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def rmserve_executable() -> str:
    """The ``rmserve`` script next to this interpreter (the virtualenv's), else the one on PATH."""
    candidate = Path(sys.executable).with_name("rmserve")
    return str(candidate) if candidate.exists() else "rmserve"


def rmserve_command(model_dir: str | None, port: int, dtype: str, extra: list[str] | None = None) -> list[str]:
    """``rmserve serve`` on loopback; ``model_dir`` None: the models come from ``extra`` (``--config models.yaml``)."""
    model = ["--model", model_dir] if model_dir is not None else []
    return [rmserve_executable(), "serve", *model, "--host", LOOPBACK, "--port", str(port), "--dtype", dtype,
            *(extra or [])]  # fmt: skip


def baseline_command(model_dir: str, port: int, dtype: str, extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "rmserve.benchmarks.baseline_server", "--model", model_dir, "--host", LOOPBACK,
            "--port", str(port), "--dtype", dtype, *(extra or [])]  # fmt: skip


def rmserve_available() -> bool:
    """Whether ``rmserve serve`` exists in this installation (the server app may land after the benchmarks)."""
    try:
        done = subprocess.run([rmserve_executable(), "serve", "--help"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(f"server exited with code {process.returncode}:\n{_tail(log_path)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=2.0).status_code == 200:
                return
        time.sleep(0.5)
    raise ServerStartError(f"server not ready after {timeout_s:.0f} s:\n{_tail(log_path)}")


def stop_process_group(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the server (rmserve shuts Ray down on it), then SIGKILL its process group if it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # its own group (start_new_session): only what it started
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


@contextlib.contextmanager
def running_server(
    command: list[str], port: int, *, log_path: Path, env: dict | None = None, timeout_s: float = 300.0
) -> Iterator[RunningServer]:
    """Run ``command`` (which must serve on ``port``) until the block ends; yields its URL and process id."""
    url = f"http://{LOOPBACK}:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
        )
    try:
        wait_ready(url, process, timeout_s, log_path)
        yield RunningServer(url, process.pid)
    finally:
        stop_process_group(process)


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants, from ``/proc`` (empty where there is no ``/proc``)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _process_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
