"""``load_reward_model(spec)``: a model name or a local checkpoint path in, a ready ``RewardModel`` out.

The one name besides paths is ``"demo"``: the built-in demo model, built and cached on first use (``demo``). Loading
a directory is ``checkpoint.load_checkpoint``; its rules (device, dtype) are importable from here too.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import (
    DEFAULT_MAX_LENGTH_CAP,
    DTYPES,
    cpu_has_bf16_units,
    load_backbone,
    load_checkpoint,
    read_normalization,
    resolve_device,
    resolve_dtype,
    resolve_prefix_cache_bytes,
)
from .errors import ModelLoadError
from .quiet import quiet_transformers
from .reward_model import RewardModel
from .spec import ModelSpec

__all__ = [
    "DEFAULT_MAX_LENGTH_CAP",
    "DTYPES",
    "cpu_has_bf16_units",
    "load_backbone",
    "load_checkpoint",
    "load_reward_model",
    "quiet_transformers",
    "read_normalization",
    "resolve_device",
    "resolve_dtype",
    "resolve_path",
    "resolve_prefix_cache_bytes",
]


def resolve_path(path: str) -> Path:
    """The checkpoint directory a model path names (``"demo"``: the demo model's, built on first use)."""
    if path == "demo":
        from .demo import ensure_demo_model  # the demo's build (training) loads only when asked for

        return ensure_demo_model()
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelLoadError(f"model path {path!r} is not a directory (rmserve loads local checkpoints only)")
    return p


def load_reward_model(spec: ModelSpec | str | None = None, **overrides) -> RewardModel:
    """Load a reward model from a local checkpoint directory (or ``"demo"``).

    Example::

        rm = load_reward_model("demo")
        rm.score([{"prompt": "Tell me about cats.", "response": "Cats are lovely, thank you for asking."}])
    """
    if spec is None or isinstance(spec, str):
        spec = ModelSpec(path=spec or "demo", **overrides)
    elif overrides:
        spec = spec.model_copy(update=overrides)
    return load_checkpoint(resolve_path(spec.path), spec)
