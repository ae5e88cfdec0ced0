"""Issue 11: ``pip install rmserve`` is the light client SDK — httpx and pydantic, no torch, transformers or Ray.

The repository is built into a wheel and installed with ``--no-deps --no-index`` into a fresh virtual environment
(no network). httpx and pydantic (and what they need) come from this test's own environment: only their files are
linked into the fresh one, so torch, transformers and ray stay unreachable from it. The wheel's metadata must
require exactly httpx and pydantic without an extra (the server is ``rmserve[serve]``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
CLIENT_DEPENDENCIES = {"httpx", "pydantic"}
SERVER_ONLY = ("torch", "transformers", "ray", "fastapi", "bitsandbytes")

pytestmark = pytest.mark.timeout(300)


def closure(names: set[str]) -> set[str]:
    """The distributions ``names`` need (no extras), as installed here."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name.lower().replace("_", "-"))
    return seen


def top_level_paths(dist_name: str) -> set[Path]:
    """The top-level modules and packages (and metadata folder) a distribution installed into site-packages."""
    dist = metadata.distribution(dist_name)
    out = set()
    for file in dist.files or []:
        first = file.parts[0]
        if first in ("..", "__pycache__") or first.endswith(".pth"):
            continue
        out.add(Path(dist.locate_file(first)))
    return out


def test_client_installs_alone_into_a_fresh_environment(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        check=True,
    )
    (wheel,) = wheels.glob("rmserve-*.whl")

    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
    )
    # httpx and pydantic from this environment, and nothing else of it.
    linked = tmp_path / "client-deps"
    linked.mkdir()
    for dist_name in closure(CLIENT_DEPENDENCIES):
        for path in top_level_paths(dist_name):
            if path.exists() and not (linked / path.name).exists():
                (linked / path.name).symlink_to(path)
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    (site / "client-deps.pth").write_text(f"{linked}\n")

    probe = """
import importlib.util, json, sys
from importlib import metadata
from rmserve.client import AsyncRewardClient, RewardClient, InvalidRequestError
base = [r for r in metadata.requires("rmserve") if "extra ==" not in r]
print(json.dumps({
    "base": base,
    "absent": {m: importlib.util.find_spec(m) is None for m in %r},
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in %r),
}))
""" % (SERVER_ONLY, SERVER_ONLY)  # noqa: UP031
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert {Requirement(r).name for r in found["base"]} == CLIENT_DEPENDENCIES
    assert all(found["absent"].values()), found["absent"]
    assert found["loaded"] == []

    # The console script comes with the light install too: it says what to install, in one line, no traceback.
    command = subprocess.run([str(env_dir / "bin" / "rmserve"), "--help"], capture_output=True, text=True)
    assert command.returncode == 1, command.stderr
    assert "pip install 'rmserve[serve]'" in command.stderr and "Traceback" not in command.stderr
    assert len(command.stderr.strip().splitlines()) == 1
