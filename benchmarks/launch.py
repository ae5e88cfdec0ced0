"""Start a server as a subprocess on a free loopback port, wait until it is ready, stop it after.

Ready means ``GET /ready`` answers 200 (rmserve, the naive baseline), or for servers without that route a probe
request of their own answers 200 (OpenRLHF's ``serve_rm.py``: ``POST /get_reward``, ``OPENRLHF_READY``).

Example::

    with running_server(baseline_command(model_dir, port, "fp32"), port, log_path=Path("baseline.log")) as server:
        ...   # server.url == "http://127.0.0.1:<port>"; server.cpu_seconds() counts its whole process tree

    setup = find_openrlhf_setup()          # the peer's python and PYTHONPATH, or None (see OPENRLHF_SETUP_HINT)
    command = openrlhf_command(setup.python, model_dir, port, "bf16")
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LOOPBACK = "127.0.0.1"
OPENRLHF_PYTHON_ENV = "RMSERVE_BENCH_OPENRLHF_PYTHON"  # the peer's interpreter (the setup script's venv)
OPENRLHF_PYTHONPATH_ENV = "RMSERVE_BENCH_OPENRLHF_PYTHONPATH"  # its source and stand-ins, "stubs:src"
OPENRLHF_SETUP_HINT = (
    "set it up with `OPENRLHF_MIRROR=<git dir of a github.com/OpenRLHF/OpenRLHF snapshot> bash "
    "/work/shared/peers/setup_openrlhf_serve_rm.sh` (from the checkout), then pass --openrlhf-python "
    "<tmp>/orlhf-venv/bin/python --openrlhf-pythonpath <tmp>/orlhf-stubs:<tmp>/orlhf-src (or set "
    f"{OPENRLHF_PYTHON_ENV} and {OPENRLHF_PYTHONPATH_ENV}); the script's default location is found on its own"
)
OPENRLHF_DTYPES = {"bf16": "bf16", "fp16": "fp16"}  # serve_rm.py's --ds.param_dtype has no fp32


@dataclass(frozen=True)
class ReadyProbe:
    """The request that says a server is up: ``method path`` (with ``body`` as JSON) answering 200."""

    method: str = "GET"
    path: str = "/ready"
    body: dict | None = None

    def check(self, url: str) -> bool:
        response = httpx.request(self.method, f"{url}{self.path}", json=self.body, timeout=30.0)
        return response.status_code == 200


READY = ReadyProbe()
OPENRLHF_READY = ReadyProbe("POST", "/get_reward", {"query": ["ready"]})  # serve_rm.py has no /ready


@dataclass(frozen=True)
class RunningServer:
    """A started server: its base URL and the process id whose tree (Ray's processes included) it runs in."""

    url: str
    pid: int

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the server's processes (Linux ``/proc``): its process tree and
        the rest of its session (a process that outlived its parent), each with the time of its children it has
        already reaped, so a process that exits during a measurement keeps counting (in its parent's total)."""
        return server_cpu_seconds(self.pid, read_proc_table())


class ServerStartError(RuntimeError):
    """The server exited or did not become ready in time (the message ends with its log's tail)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


RMSERVE_CLI_MODULE = "rmserve.serve.cli.main"  # `python -m` it where there is no `rmserve` script


def rmserve_executable() -> list[str]:
    """How to run ``rmserve``: the script next to this interpreter (the virtualenv's), else one on PATH, else this
    interpreter with ``-m rmserve.serve.cli.main`` (rmserve imported from a checkout through PYTHONPATH, no console
    script: the GPU pass)."""
    return resolve_rmserve_executable(Path(sys.executable), shutil.which("rmserve"))


def resolve_rmserve_executable(python: Path, on_path: str | None) -> list[str]:
    candidate = python.with_name("rmserve")
    if candidate.exists():
        return [str(candidate)]
    return [on_path] if on_path else [str(python), "-m", RMSERVE_CLI_MODULE]


def rmserve_command(model_dir: str | None, port: int, dtype: str, extra: list[str] | None = None) -> list[str]:
    """``rmserve serve`` on loopback; ``model_dir`` None: the models come from ``extra`` (``--config models.yaml``)."""
    model = ["--model", model_dir] if model_dir is not None else []
    return [*rmserve_executable(), "serve", *model, "--host", LOOPBACK, "--port", str(port), "--dtype", dtype,
            *(extra or [])]  # fmt: skip


def baseline_command(model_dir: str, port: int, dtype: str, extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "rmserve.benchmarks.baseline_server", "--model", model_dir, "--host", LOOPBACK,
            "--port", str(port), "--dtype", dtype, *(extra or [])]  # fmt: skip


def openrlhf_command(python: str, model_dir: str, port: int, dtype: str, attn: str = "sdpa",
                     extra: list[str] | None = None) -> list[str]:  # fmt: skip
    """OpenRLHF's own reward server (``openrlhf.cli.serve_rm``) on loopback, at its defaults but for what a CPU (or
    a machine without flash-attn) needs: ``attn`` (its default ``flash_attention_2`` needs the flash-attn package)
    and the dtype, which must be one it has (bf16, its default, or fp16)."""
    if dtype not in OPENRLHF_DTYPES:
        raise ValueError(f"serve_rm.py loads bf16 or fp16 only (--ds.param_dtype), not {dtype!r}")
    return [python, "-m", "openrlhf.cli.serve_rm", "--reward.model_name_or_path", model_dir,
            "--ds.attn_implementation", attn, "--ds.param_dtype", OPENRLHF_DTYPES[dtype],
            "--port", str(port), "--host", LOOPBACK, *(extra or [])]  # fmt: skip


@dataclass(frozen=True)
class OpenRLHFSetup:
    """Where OpenRLHF's ``serve_rm.py`` can run: its interpreter and the ``PYTHONPATH`` holding its source."""

    python: str
    pythonpath: str
    found: str = "flag"  # "flag", "environment" or "default location"
    versions: dict = field(default_factory=dict, compare=False)

    def env(self) -> dict:
        return {"PYTHONPATH": self.pythonpath}


def setup_script_location(tmpdir: str | None = None) -> tuple[str, str]:
    """(python, PYTHONPATH) where ``setup_openrlhf_serve_rm.sh`` puts the peer: ``$TMPDIR`` or ``/tmp``."""
    root = Path(tmpdir or os.environ.get("TMPDIR") or "/tmp")
    return str(root / "orlhf-venv" / "bin" / "python"), f"{root / 'orlhf-stubs'}:{root / 'orlhf-src'}"


def resolve_openrlhf_setup(python: str | None, pythonpath: str | None, environ: dict,
                           default: tuple[str, str]) -> tuple[str, str, str] | None:  # fmt: skip
    """(python, PYTHONPATH, how it was found): the flags, else the environment, else the setup script's default
    location; None when nothing names a peer and the default location has no interpreter."""
    if python:
        return python, pythonpath or environ.get(OPENRLHF_PYTHONPATH_ENV, ""), "flag"
    if environ.get(OPENRLHF_PYTHON_ENV):
        return environ[OPENRLHF_PYTHON_ENV], pythonpath or environ.get(OPENRLHF_PYTHONPATH_ENV, ""), "environment"
    if Path(default[0]).exists():
        return default[0], pythonpath or default[1], "default location"
    return None


def find_openrlhf_setup(python: str | None = None, pythonpath: str | None = None) -> tuple[OpenRLHFSetup | None, str]:
    """The peer's setup and a one-line note; (None, why and how to set it up) when it is absent or broken.

    Checks that the interpreter imports ``openrlhf.cli.serve_rm``'s module and reads its torch and transformers
    versions (for the report)."""
    found = resolve_openrlhf_setup(python, pythonpath, dict(os.environ), setup_script_location())
    if found is None:
        return None, f"OpenRLHF serve_rm.py skipped: no setup found; {OPENRLHF_SETUP_HINT}"
    python, pythonpath, how = found
    probe = ("import importlib.util, json, torch, transformers; "
             "assert importlib.util.find_spec('openrlhf.cli.serve_rm'), 'openrlhf.cli.serve_rm not importable'; "
             "print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__}))")  # fmt: skip
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=180,
                              env={**os.environ, "PYTHONPATH": pythonpath})  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"OpenRLHF serve_rm.py skipped: {python} did not run ({exc}); {OPENRLHF_SETUP_HINT}"
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["?"])[-1]
        where = f"{python} with PYTHONPATH={pythonpath}"
        return None, f"OpenRLHF serve_rm.py skipped: {where}: {why}; {OPENRLHF_SETUP_HINT}"
    versions = json.loads(done.stdout.strip().splitlines()[-1])
    setup = OpenRLHFSetup(python, pythonpath, how, versions)
    note = (f"OpenRLHF serve_rm.py: {python} (PYTHONPATH={pythonpath}, found by {how}; torch {versions['torch']}, "
            f"transformers {versions['transformers']})")  # fmt: skip
    return setup, note


@functools.lru_cache(maxsize=1)
def rmserve_serve_help() -> str | None:
    """``rmserve serve --help`` (None when ``rmserve serve`` does not run in this installation)."""
    try:
        done = subprocess.run([*rmserve_executable(), "serve", "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def rmserve_available() -> bool:
    """Whether ``rmserve serve`` exists in this installation (the server app may land after the benchmarks)."""
    return rmserve_serve_help() is not None


def help_offers_runtime(help_text: str | None, runtime: str) -> bool:
    """Whether a ``--help`` text lists a ``--runtime`` flag that accepts ``runtime``."""
    if not help_text or not re.search(r"--runtime\b", help_text):
        return False
    return re.search(rf"\b{re.escape(runtime)}\b", help_text) is not None


def rmserve_supports_runtime(runtime: str) -> bool:
    """Whether this ``rmserve serve`` accepts ``--runtime <runtime>`` (e.g. ``inprocess``: no Ray)."""
    return help_offers_runtime(rmserve_serve_help(), runtime)


def wait_ready(
    url: str, process: subprocess.Popen, timeout_s: float, log_path: Path, probe: ReadyProbe = READY
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(f"server exited with code {process.returncode}:\n{_tail(log_path)}")
        with contextlib.suppress(httpx.HTTPError):
            if probe.check(url):
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
    command: list[str],
    port: int,
    *,
    log_path: Path,
    env: dict | None = None,
    timeout_s: float = 300.0,
    probe: ReadyProbe = READY,
) -> Iterator[RunningServer]:
    """Run ``command`` (which must serve on ``port``) until the block ends; yields its URL and process id."""
    url = f"http://{LOOPBACK}:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
        )
    try:
        wait_ready(url, process, timeout_s, log_path, probe)
        yield RunningServer(url, process.pid)
    finally:
        stop_process_group(process)


@dataclass(frozen=True)
class ProcStat:
    """What the CPU accounting needs of one ``/proc/<pid>/stat`` line; times in clock ticks."""

    pid: int
    ppid: int
    session: int
    own_ticks: int  # utime + stime
    reaped_children_ticks: int  # cutime + cstime: children it has waited for

    @classmethod
    def parse(cls, line: str) -> ProcStat:
        """One ``/proc/<pid>/stat`` line (the command name may hold spaces and parentheses: split after the last
        ``)``): field 4 ppid, 6 session, 14-17 utime stime cutime cstime."""
        head, _, rest = line.rpartition(")")
        fields = rest.split()
        utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
        return cls(int(head.split("(", 1)[0]), int(fields[1]), int(fields[3]), utime + stime, cutime + cstime)


def read_proc_table(proc: Path = Path("/proc")) -> dict[int, ProcStat]:
    """Every process now in ``/proc`` (empty where there is none); processes that vanish while reading are skipped."""
    table: dict[int, ProcStat] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir(proc):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = ProcStat.parse((proc / entry / "stat").read_text())
                    table[stat.pid] = stat
    return table


def server_pids(root: int, table: dict[int, ProcStat]) -> list[int]:
    """``root``, its descendants, and the other processes of its session (``start_new_session``: the session id is
    ``root``'s pid), e.g. a daemon that outlived its parent and was adopted by init; each once."""
    children: dict[int, list[int]] = {}
    for stat in table.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    seen: dict[int, None] = {}
    todo = [root] + [stat.pid for stat in table.values() if stat.session == root]
    while todo:
        pid = todo.pop(0)
        if pid in seen or pid not in table:
            continue
        seen[pid] = None
        todo += children.get(pid, [])
    return list(seen)


def process_tree(root: int) -> list[int]:
    """``root``, its descendants and the rest of its session, from ``/proc`` (empty where there is no ``/proc``)."""
    return server_pids(root, read_proc_table())


def tree_cpu_ticks(root: int, table: dict[int, ProcStat]) -> int:
    """User + system ticks of the server's processes, each with its reaped children's (``cutime + cstime``): when a
    child exits and is waited for, its ticks move into its parent's, so the sum never drops."""
    return sum(table[pid].own_ticks + table[pid].reaped_children_ticks for pid in server_pids(root, table))


def server_cpu_seconds(root: int, table: dict[int, ProcStat]) -> float:
    return tree_cpu_ticks(root, table) / os.sysconf("SC_CLK_TCK")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
