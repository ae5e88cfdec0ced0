"""Shared fixtures: tiny real checkpoints and the demo model (built once, cached under .cache/)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # for `import checkpoints`

# The demo model is cached in the repository's ignored .cache/ so repeated runs reuse it;
# Ray workers started by the tests inherit this variable.
os.environ.setdefault("RMSERVE_CACHE_DIR", str(ROOT / ".cache"))


@pytest.fixture(scope="session")
def device() -> str:
    """Where the model tests run: the CPU, or ``RMSERVE_TEST_DEVICE`` (``cuda`` for the GPU pass)."""
    return os.environ.get("RMSERVE_TEST_DEVICE", "cpu")


@pytest.fixture
def unshared(demo_model):
    """The demo model's engine with prefix sharing and both caches off for one test (then restored)."""
    from checkpoints import sharing_off

    with sharing_off(demo_model.engine) as engine:
        yield engine


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    from rmserve.model.demo import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture(scope="session")
def demo_model(demo_model_dir):
    from rmserve.model import load_reward_model

    return load_reward_model(str(demo_model_dir), dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """``make(head_format, arch='llama', tok_variant='chat', seed=0, **config_extra) -> (dir, reference, tokenizer)``;
    another ``seed`` gives different weights (a second, different model)."""
    import checkpoints

    cache: dict = {}

    def make(head_format: str = "score", arch: str = "llama", tok_variant: str = "chat", seed: int = 0, **extra):
        key = (head_format, arch, tok_variant, seed, tuple(sorted(extra.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-{head_format}-{arch}-{tok_variant}-{seed}")
            cache[key] = checkpoints.save_checkpoint(out, head_format, arch, tok_variant, seed, **extra)
        return cache[key]

    return make
