"""Where a reward model's weights live between reward phases: on its device (awake), in host memory (sleep level 1)
or nowhere (sleep level 2), so that a trainer sharing the accelerator gets the memory back.

* Level 1: every parameter and buffer of the backbone and the head is copied to host memory — pinned when the
  device is an accelerator, so the copy back runs at full bus speed — and the device's cached blocks go back to the
  driver; the prefix and reward caches are emptied. On a CPU-only server the weights already are in host memory:
  level 1 frees the caches only.
* Level 2: the caches are emptied and the engine lets go of its modules (it holds placeholders that refuse to run),
  so the weights' memory is freed: device memory back to the driver, host memory back to the operating system
  (``malloc_trim``: glibc keeps freed blocks otherwise). Waking loads the checkpoint again through
  ``load_checkpoint``, the path the server starts with, so the weights are the same bits.

Rewards after a wake equal those before bit for bit (fp32): the same weights, on the same device, in the same dtype.
Neither step may overlap a forward: the caller (``serve.core.scoring_core.ScoringCore``) lets the work it admitted
finish first.

Example::

    residency = WeightResidency(model)
    residency.sleep(2)      # weights dropped; model.engine refuses to run
    residency.wake()        # weights reloaded from model.path
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import logging
from collections.abc import Iterator

import torch

from .checkpoint import load_checkpoint
from .errors import InvalidRequestError
from .reward_model import RewardModel

log = logging.getLogger("rmserve.model")
LEVELS = (1, 2)


class WeightResidency:
    """Moves one ``RewardModel``'s weights out of the way (``sleep``) and back (``wake``). Not thread-safe: one
    caller at a time, with no forward running."""

    def __init__(self, model: RewardModel):
        self.model = model
        self.level = 0  # 0 awake, else the level it sleeps at

    def sleep(self, level: int) -> None:
        """Release the model's memory at ``level`` (1 or 2); a model that already sleeps stays as it is."""
        check_level(level)
        if self.level:
            return
        engine = self.model.engine
        if level == 1 and engine.device.type != "cpu" and self.model.spec.quantization != "none":
            raise InvalidRequestError(
                "sleep level 1 cannot move quantized (bitsandbytes) weights off the accelerator; use level 2",
                param="level",
            )
        engine.drop_caches()
        if level == 1:
            if engine.device.type != "cpu":
                try:
                    _move(engine.backbone, engine.head, torch.device("cpu"), pin=True)
                except BaseException:  # e.g. out of pinned memory: all back, so the model stays usable awake
                    _move(engine.backbone, engine.head, engine.device, pin=False)
                    raise
        else:
            engine.use_weights(_Dropped(), _dropped_head())
        self.level = level
        release_freed_memory(engine.device)

    def wake(self) -> None:
        """Bring the weights back to the model's device (level 2: reload them from the checkpoint)."""
        engine = self.model.engine
        if self.level == 1 and engine.device.type != "cpu":
            _move(engine.backbone, engine.head, engine.device, pin=False)
        elif self.level == 2:
            spec = self.model.spec.model_copy(update={"forward_overhead_tokens": engine.overhead_tokens})
            with weights_in_own_mappings():
                fresh = load_checkpoint(self.model.path, spec).engine  # the start-up path: the same bits
            engine.use_weights(fresh.backbone, fresh.head)
            del fresh
            release_freed_memory(engine.device)
        self.level = 0


def check_level(level: object) -> int:
    """``level`` when it is a sleep level (the int 1 or 2), else a 422 naming the ``level`` parameter."""
    if type(level) is not int or level not in LEVELS:  # not True, not 2.0
        raise InvalidRequestError(
            f"level must be 1 (weights to host memory) or 2 (weights dropped), got {level!r}", param="level"
        )
    return level  # type: ignore[return-value]


def _move(backbone: torch.nn.Module, head: torch.nn.Module, device: torch.device, *, pin: bool) -> None:
    """Every parameter and buffer of both modules to ``device``, in place (modules keep their identity)."""
    with torch.no_grad():
        for module in (backbone, head):
            for param in module.parameters():
                param.data = _copy(param.data, device, pin)
            for owner in module.modules():
                for name, buffer in list(owner.named_buffers(recurse=False)):
                    setattr(owner, name, _copy(buffer, device, pin))
    if device.type == "cuda" or any(p.is_cuda for p in backbone.parameters()):
        torch.cuda.synchronize()


def _copy(tensor: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    if pin and device.type == "cpu" and torch.cuda.is_available():
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
        host.copy_(tensor)
        return host
    return tensor.to(device, non_blocking=tensor.is_pinned())


class _Dropped(torch.nn.Module):
    """What the engine holds in place of a backbone at sleep level 2: no weights, and no forward."""

    def forward(self, *args, **kwargs):  # noqa: ARG002 (the backbone's signature)
        raise RuntimeError("the model's weights were dropped (sleep level 2); wake it first")


def _dropped_head() -> torch.nn.Linear:
    return torch.nn.Linear(1, 1, bias=False, device="meta")


def release_freed_memory(device: torch.device) -> None:
    """Hand memory that nothing references any more back: the accelerator's cached blocks to the driver, the C
    heap's free pages to the operating system."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _libc_function(name: str):
    """A glibc function (None elsewhere, e.g. musl or macOS)."""
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):
        return None


def _malloc_trim():
    """glibc's ``malloc_trim``: without it, freed weights stay in the process's heap."""
    return _libc_function("malloc_trim")


# glibc's mallopt parameters, and the bounds of its dynamic rule (malloc(3)): a block above the mmap threshold gets a
# mapping of its own, returned to the system the moment it is freed; the rule raises the threshold to the size of every
# such block freed, up to 32 MiB on 64-bit systems, and the heap's trim threshold to twice that.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_START = 128 * 1024
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


@contextlib.contextmanager
def weights_in_own_mappings() -> Iterator[None]:
    """Allocate what is loaded inside the block (the weights) in mappings of their own, so that dropping them (sleep
    level 2) gives all of their memory back. Wrap every load of a model that may sleep: at start-up and on wake.

    Without it, glibc's dynamic rule raises its threshold as soon as the load frees a large temporary (a checkpoint's
    bf16 tensor converted to fp32), and the weights allocated after it go to the heap, among small allocations that
    outlive them: a sleep could give back only part of them. The threshold is the start value during the load, then
    what the dynamic rule reaches at most (fixed from then on, with the trim threshold it goes with); no-op without
    glibc."""
    mallopt = _libc_function("mallopt")
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_START)
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
            mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_MAX)
