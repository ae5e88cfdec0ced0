"""Fused norms and MLPs: each RMSNorm and MLP module of the backbone runs its own ``forward`` through
``torch.compile``, so the elementwise work around the matmuls (an RMSNorm's upcast, square, mean, rsqrt, scale and
downcast; the MLP's activation times its up projection) runs as one generated loop instead of one pass over memory
per operation.

Why: on a CPU in eager mode those passes cost about as much as the linear layers themselves (bench-20M, bf16, a
forward of 4,000 tokens: an RMSNorm 2.3 ms, the up projection's matmul 1.6 ms); compiled, an RMSNorm takes a tenth
of that. Each module's *own* code is compiled, whatever the architecture writes there (Gemma's ``1 + weight``,
Qwen3's per-head norms, Phi-3's fused gate/up), so what it computes is unchanged up to the rounding of a fused
loop (fp32 rewards within 1e-5 of transformers, tested). Attention, the caches and the head stay eager.

When (``model.compile``, ``wanted``): ``auto`` compiles on a CPU, in the default (not batch-invariant) mode, for
unquantized models at least ``AUTO_MIN_HIDDEN`` wide (a narrower model's elementwise passes cost little, and
compiling costs seconds at load); ``on`` wherever asked; ``off`` never. Each module class compiles once per process
(instances share the code; shapes are dynamic), at load (``compile_backbone`` runs every compiled class once on
small seeded random inputs: rows and tokens of 1 and more, which compile apart, each output checked against the
eager forward's). If compiling fails (no C++ compiler, an unsupported operation), the backbone stays eager and the
load logs why; a class whose compiled output disagrees with its eager one stays eager too (seen: inductor's disk
cache hands a kernel built for another CPU capability back, keyed without it, and it computes garbage); if a later
call fails to compile, that module goes back to eager for good.

Example::

    if wanted(spec.compile, backbone, device, batch_invariant=False):
        compile_backbone(backbone)            # -> the number of modules now compiled
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger(__name__)

AUTO_MIN_HIDDEN = 512  # ``auto`` compiles models at least this wide (hidden size)
WARM_UP_SHAPES = ((1, 1), (1, 3), (2, 1), (2, 3))  # (rows, tokens): a size of 1 compiles apart from larger ones
# How far a compiled output may be from the eager one at warm-up, relative to the eager output's largest magnitude:
# a fused loop keeps fp32 where eager rounds each step to the model's dtype. A miscompile is off by far more.
AGREEMENT = {torch.float32: 1e-4, torch.float64: 1e-8}
HALF_AGREEMENT = 5e-2  # bf16, fp16
FUSED_SUFFIXES = ("RMSNorm", "MLP")  # module classes whose forward is compiled, by class-name suffix


def wanted(setting: str, backbone: torch.nn.Module, device: torch.device, *, batch_invariant: bool) -> bool:
    """Whether ``model.compile`` (``auto``/``on``/``off``) compiles this backbone's norms and MLPs."""
    if setting == "off" or batch_invariant:  # the invariant mode's fixed-shape kernels are its own
        return False
    if setting == "on":
        return True
    hidden = getattr(getattr(backbone, "config", None), "hidden_size", 0) or 0
    plain = all(type(m) is torch.nn.Linear for m in backbone.modules() if isinstance(m, torch.nn.Linear))
    return device.type == "cpu" and plain and hidden >= AUTO_MIN_HIDDEN


class FusedForward:
    """A module's ``forward`` through ``torch.compile``; eager again for good if compiling ever fails."""

    def __init__(self, module: torch.nn.Module):
        self.name = type(module).__name__
        self.eager = module.forward
        self.compiled = torch.compile(self.eager, dynamic=True)
        self.failed: BaseException | None = None

    def __call__(self, *args, **kwargs):
        if self.failed is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:
                if not _is_compile_failure(exc):
                    raise
                self.failed = exc
                log.warning("torch.compile failed for a %s; it runs eagerly from now on: %s", self.name, exc)
        return self.eager(*args, **kwargs)


def compile_backbone(backbone: torch.nn.Module) -> int:
    """Compile ``backbone``'s RMSNorm and MLP modules in place (idempotent) and run each class once on small inputs;
    returns how many modules run compiled (0 when compiling failed: the backbone is left as it was). A class whose
    forward does not take one hidden-state tensor (the warm-up's call fails) stays eager."""
    fused = [m for m in backbone.modules() if type(m).__name__.endswith(FUSED_SUFFIXES)]
    started = time.perf_counter()
    for module in fused:
        if not isinstance(module.forward, FusedForward):
            module.forward = FusedForward(module)
    try:
        eager = _warm_up(fused)
    except Exception as exc:
        if not _is_compile_failure(exc):
            raise
        eager = set(map(type, fused))
        log.warning("torch.compile is unavailable here, so norms and MLPs run eagerly (model.compile: off): %s", exc)
    for module in fused:
        if type(module) in eager:
            del module.forward  # the class's own forward again
    compiled = sum(type(module) not in eager and module.forward.failed is None for module in fused)
    if compiled:
        log.info("compiled %d norm and MLP modules in %.1f s (model.compile)", compiled, time.perf_counter() - started)
    return compiled


def _warm_up(modules: list[torch.nn.Module]) -> set[type]:
    """One call per module class and input shape class (``WARM_UP_SHAPES``), so no request waits for a compile, each
    output compared with the eager forward's; returns the classes left eager: those whose forward the call does not
    fit, and those whose compiled output disagrees. A failure of torch.compile itself is raised."""
    seen: set[type] = set()
    unfit: set[type] = set()
    for module in modules:
        if type(module) in seen:
            continue
        seen.add(type(module))
        param = next(module.parameters(), None)
        if param is None:
            unfit.add(type(module))
            continue
        width, name = _input_width(module, param), type(module).__name__
        generator = torch.Generator(device=param.device).manual_seed(0)
        try:
            with torch.inference_mode():
                for rows, tokens in WARM_UP_SHAPES:
                    x = torch.randn((rows, tokens, width), generator=generator, device=param.device).to(param.dtype)
                    compiled, eager = module.forward.compiled(x), module.forward.eager(x)
                    if not _agrees(compiled, eager):
                        log.warning(
                            "%s stays eager: its compiled forward disagrees with the eager one on a warm-up input "
                            "(a stale or foreign inductor cache? TORCHINDUCTOR_CACHE_DIR)",
                            name,
                        )
                        unfit.add(type(module))
                        break
        except Exception as exc:
            if _is_compile_failure(exc):
                raise
            log.info("%s stays eager: its forward does not take one hidden-state tensor (%s)", name, exc)
            unfit.add(type(module))
    return unfit


def _agrees(compiled, eager) -> bool:
    """A compiled output within ``AGREEMENT`` of the eager one (relative to its largest finite magnitude), finite
    where it is finite."""
    if not (isinstance(compiled, torch.Tensor) and isinstance(eager, torch.Tensor)) or compiled.shape != eager.shape:
        return False
    got, want = compiled.float(), eager.float()
    finite = want.isfinite()
    if not torch.equal(got.isfinite(), finite):
        return False
    if not finite.any():
        return True
    got, want = got[finite], want[finite]
    scale = 1.0 + want.abs().max().item()
    return (got - want).abs().max().item() <= AGREEMENT.get(eager.dtype, HALF_AGREEMENT) * scale


def _input_width(module: torch.nn.Module, param: torch.Tensor) -> int:
    """The size of the last dimension a module takes: a norm's weight's, an MLP's first linear's input."""
    first = next((m for m in module.modules() if isinstance(m, torch.nn.Linear)), None)
    return first.in_features if first is not None else param.shape[-1]


def _is_compile_failure(exc: BaseException) -> bool:
    """An error of torch.compile itself (dynamo, inductor, the C++ toolchain), not of the computation."""
    return type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")) or isinstance(
        exc, (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.Unsupported)
    )
