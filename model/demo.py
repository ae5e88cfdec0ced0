"""The built-in demo reward model: built offline and deterministically, cached, the default everywhere.

``ensure_demo_model()`` returns the cached checkpoint directory, building it on first use (about a
minute on 2 CPU cores): a byte-level BPE tokenizer trained on the synthetic task's text, and a tiny
LLaMA reward model trained on the task of ``rmserve.model.synthetic`` with the pairwise and listwise
losses plus a small imitation term. Its held-out pairwise accuracy is stored next to it.

Cache: ``$RMSERVE_CACHE_DIR`` or ``$XDG_CACHE_HOME/rmserve`` or ``~/.cache/rmserve``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

from .checkpoint import load_checkpoint
from .errors import ModelLoadError
from .spec import ModelSpec
from .synthetic import make_preference_pairs, make_rankings
from .training import TrainConfig, train_reward_model

DEMO_VERSION = "v1"
TRAIN_SEED, HELDOUT_SEED = 0, 12345
DEMO_CONFIG = TrainConfig(
    hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=176,
    vocab_size=768, max_length=256, steps=700, batch_size=32, lr=3e-3, beta=0.05, seed=TRAIN_SEED,
)  # fmt: skip
MARKER = "rmserve_demo.json"


def cache_root() -> Path:
    if os.environ.get("RMSERVE_CACHE_DIR"):
        return Path(os.environ["RMSERVE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rmserve"


def demo_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or cache_root()) / f"demo-{DEMO_VERSION}"


def heldout_pairs(n: int = 400) -> list[dict]:
    """Pairs the demo model never trained on (a different seed), for accuracy checks."""
    return make_preference_pairs(n, seed=HELDOUT_SEED)


def training_records() -> list[dict]:
    return make_preference_pairs(3000, seed=TRAIN_SEED) + make_rankings(1000, seed=TRAIN_SEED + 1)


def pairwise_accuracy(rm, pairs: list[dict]) -> float:
    """Fraction of pairs where the chosen response gets the higher reward."""
    chosen = rm.score([{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs])
    rejected = rm.score([{"prompt": p["prompt"], "response": p["rejected"]} for p in pairs])
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)


def build_demo_model(out_dir: Path, *, progress: bool = False) -> dict:
    """Train the demo model into ``out_dir`` and return its report (accuracy, losses)."""
    result = train_reward_model(training_records(), out_dir, DEMO_CONFIG, progress=progress)
    rm = load_checkpoint(out_dir, ModelSpec(path=str(out_dir), dtype="fp32", device="cpu"))
    report = {
        "version": DEMO_VERSION,
        "heldout_pairwise_accuracy": pairwise_accuracy(rm, heldout_pairs()),
        "first_loss": result.losses[0],
        "final_loss": sum(result.losses[-20:]) / 20,
    }
    (out_dir / MARKER).write_text(json.dumps(report, indent=2))
    return report


def ensure_demo_model(cache_dir: Path | None = None, *, progress: bool = False) -> Path:
    """The demo checkpoint directory, built on first use; safe when several processes race."""
    target = demo_dir(cache_dir)
    if (target / MARKER).exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(target.parent / f".demo-{DEMO_VERSION}.lock", "w")  # noqa: SIM115 - held by the with below
    except OSError as exc:
        raise ModelLoadError(
            f"the demo model is built on first use into {target.parent}, which cannot be written ({exc.strerror}); "
            "point RMSERVE_CACHE_DIR at a writable directory"
        ) from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait, then find it built
        if (target / MARKER).exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=target.parent))
        try:
            build_demo_model(tmp, progress=progress)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def demo_report(cache_dir: Path | None = None) -> dict:
    return json.loads((ensure_demo_model(cache_dir) / MARKER).read_text())
