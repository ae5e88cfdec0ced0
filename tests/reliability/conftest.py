"""Fixtures of the reliability tests: one Ray instance for the package, the offline reference model, and the
figures report (printed at the end of the run, saved to ``$RMSERVE_CACHE_DIR/reliability/figures.json``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliability_harness import Figures, app_config, deployed, ray_serve_instance  # noqa: E402

_FIGURES = Figures(Path(os.environ.get("RMSERVE_CACHE_DIR", ".cache")) / "reliability" / "figures.json")


@pytest.fixture(scope="package")
def serve_instance():
    """One local Ray instance with Serve's proxy on a free loopback port; modules deploy their apps on it."""
    with ray_serve_instance(ray_cpus=4) as instance:
        yield instance


@pytest.fixture(scope="package")
def plain_app(serve_instance, demo_model_dir):
    """The demo model with the default limits (the soak and the hostile-input tests share it)."""
    config = app_config(demo_model_dir, "rel-plain", batching={"batch_wait_timeout_s": 0.005})
    with deployed(serve_instance, config, prefix="/plain") as app:
        yield app


@pytest.fixture(scope="package")
def faults_app(serve_instance, demo_model_dir):
    """Fault injection on, a small queue (32 items) that answers 429 with Retry-After: 1 (overload, OOM and
    client-gone tests share it; each resets the fault plan when done)."""
    config = app_config(
        demo_model_dir,
        "rel-faults",
        testing={"fault_injection": True},
        limits={"max_queued_items": 32, "max_items_per_request": 32, "retry_after_s": 1},
        batching={"batch_wait_timeout_s": 0.005},
    )
    with deployed(serve_instance, config, prefix="/faults") as app:
        yield app


@pytest.fixture(scope="session")
def figures() -> Figures:
    return _FIGURES


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _FIGURES.values:
        _FIGURES.save()
        terminalreporter.section("reliability figures")
        for line in _FIGURES.lines():
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"(saved to {_FIGURES.path})")
