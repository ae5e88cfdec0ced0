"""Compiled norms and MLPs (``model.compile``, ``model/fusion.py``): the rewards transformers computes, whatever the
architecture's norm and MLP look like; ``auto`` picks wide CPU models only; a failing compiler leaves the model
eager and its rewards right."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from checkpoints import reference_reward

from rmserve.model import load_reward_model
from rmserve.model.fusion import AUTO_MIN_HIDDEN, FusedForward, compile_backbone

FP32_TOL = 1e-5
# inductor compiles C++ on a CPU (the machines this project targets have g++; without one, see the last test)
needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="no C++ compiler for torch.compile"
)


def groups(vocab: int, seed: int) -> list[list[int]]:
    """Prompts shared by three responses each (prefix rows, cached prompts, cascade attention) and lone items."""
    rng = random.Random(seed)

    def rand(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    items = []
    for prompt_len in (5, 40, 90):
        prompt = rand(prompt_len)
        items += [prompt + rand(rng.randint(1, 12)) for _ in range(3)]
    return items + [rand(n) for n in (1, 2, 33)]


@needs_compiler
@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "gemma3"])
def test_compiled_norms_and_mlps_keep_transformers_rewards(checkpoint_factory, arch):
    """Llama's norm and MLP, Qwen3's per-head query/key norms, Phi-3's fused gate/up projection and Gemma 3's
    ``1 + weight`` norms, each compiled from its own code: fp32 rewards within 1e-5 of transformers, in one batch
    (shared prompts) and one item per batch (cached prompts)."""
    path, ref, tok = checkpoint_factory("score", arch=arch)
    rm = load_reward_model(str(path), dtype="fp32", device="cpu", compile="on", forward_overhead_tokens=0)
    compiled = [m for m in rm.engine.backbone.modules() if isinstance(m.__dict__.get("forward"), FusedForward)]
    assert rm.engine.runner.compiled_modules == len(compiled) > 0
    items = groups(len(tok), seed=len(arch))
    expected = [reference_reward(ref, seq) for seq in items]
    assert rm.engine.score_batch(items) == pytest.approx(expected, abs=FP32_TOL)
    rm.engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=1 << 24, reward_cache_items=0)
    assert [rm.engine.score_batch([seq])[0] for seq in items] == pytest.approx(expected, abs=FP32_TOL)
    assert all(isinstance(m.forward, FusedForward) and m.forward.failed is None for m in compiled)


def wide_checkpoint(out):
    """A one-layer Llama ``AUTO_MIN_HIDDEN`` wide (what ``auto`` compiles), its reference model and tokenizer."""
    from checkpoints import build_tokenizer
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=AUTO_MIN_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(3)
    ref = LlamaForSequenceClassification(config).eval()
    ref.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out, ref, tok


@needs_compiler
def test_auto_compiles_wide_cpu_models_only(checkpoint_factory, tmp_path):
    """``auto``: a model ``AUTO_MIN_HIDDEN`` wide is compiled on the CPU; a narrow one, the batch-invariant mode and
    ``off`` are not (invariance has its own fixed-shape kernels, even with ``on``)."""
    path, _ref, _tok = checkpoint_factory("score", arch="llama")
    assert load_reward_model(str(path), dtype="fp32", device="cpu").engine.runner.compiled_modules == 0
    invariant = load_reward_model(str(path), dtype="fp32", batch_invariant=True, compile="on")
    assert invariant.engine.runner.compiled_modules == 0
    wide, ref, tok = wide_checkpoint(tmp_path)
    rm = load_reward_model(str(wide), dtype="fp32", device="cpu")
    assert rm.engine.runner.compiled_modules > 0
    seq = groups(len(tok), seed=3)[4]
    assert rm.engine.score_batch([seq]) == pytest.approx([reference_reward(ref, seq)], abs=FP32_TOL)
    fresh = load_reward_model(str(wide), dtype="fp32", device="cpu", compile="off").engine.backbone
    rm.engine.runner.backbone = fresh  # what a reload (wake from sleep level 2) does: compiled again
    assert isinstance(fresh.norm.forward, FusedForward) and rm.engine.runner.compiled_modules > 0
    rm.engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=1 << 24, reward_cache_items=0)
    assert rm.engine.score_batch([seq]) == pytest.approx([reference_reward(ref, seq)], abs=FP32_TOL)
    off = load_reward_model(str(wide), dtype="fp32", device="cpu", compile="off")
    assert off.engine.runner.compiled_modules == 0
    assert not any(isinstance(m.__dict__.get("forward"), FusedForward) for m in off.engine.backbone.modules())


def test_a_failing_compiler_leaves_the_model_eager_and_right(checkpoint_factory, caplog):
    """Inductor pointed at a C++ compiler that does not exist (what a machine without one gives): the load logs it,
    every module runs its own eager forward again, rewards are transformers'."""
    import torch._inductor.config as inductor_config

    path, ref, tok = checkpoint_factory("score", arch="mistral")
    torch._dynamo.reset()  # compile anew, not from this process's earlier compiles
    try:
        with (
            inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}),
            caplog.at_level("WARNING", logger="rmserve.model.fusion"),
        ):
            rm = load_reward_model(str(path), dtype="fp32", device="cpu", compile="on")
    finally:
        torch._dynamo.reset()
    assert rm.engine.runner.compiled_modules == 0
    assert "run eagerly" in caplog.text
    assert not any(isinstance(m.__dict__.get("forward"), FusedForward) for m in rm.engine.backbone.modules())
    items = groups(len(tok), seed=7)
    assert rm.engine.score_batch(items) == pytest.approx([reference_reward(ref, s) for s in items], abs=FP32_TOL)


@needs_compiler
def test_a_norm_or_mlp_that_takes_other_arguments_stays_eager():
    """A module named like an MLP whose forward wants two tensors (an architecture this project has not seen) is left
    eager, and the rest of the backbone is still compiled."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class PairMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x, gate):
            return self.proj(x) * gate

    backbone = torch.nn.Module()
    backbone.norm, backbone.mlp = LlamaRMSNorm(8), PairMLP()
    assert compile_backbone(backbone) == 1
    assert isinstance(backbone.norm.forward, FusedForward) and "forward" not in backbone.mlp.__dict__
    x = torch.randn(2, 3, 8)
    with torch.inference_mode():
        assert torch.allclose(backbone.norm(x), LlamaRMSNorm.forward(backbone.norm, x), atol=1e-6)
        assert backbone.mlp(x, x).shape == (2, 3, 8)


SCORE_IN_A_PROCESS = """
import json, sys
from rmserve.model import load_reward_model
rm = load_reward_model(sys.argv[1], dtype="fp32", device="cpu", compile="on", forward_overhead_tokens=0)
items = json.loads(sys.argv[2])
print(json.dumps({"compiled": rm.engine.runner.compiled_modules, "rewards": rm.engine.score_batch(items)}))
"""


@needs_compiler
@pytest.mark.skipif(
    not torch.backends.cpu.get_cpu_capability().startswith("AVX512"), reason="needs a CPU above AVX2 to emulate one"
)
def test_a_kernel_from_another_cpu_capability_in_the_cache_is_not_used(checkpoint_factory, tmp_path):
    """inductor's disk cache keys a compiled norm or MLP without the CPU capability it was built for: a process that
    runs ATen at another capability (here AVX2 on an AVX-512 CPU, as `ATEN_CPU_CAPABILITY` sets) gets the kernel back
    and it computes garbage (NaN). The warm-up's comparison with the eager forward leaves those classes eager: rewards
    stay transformers'."""
    import json
    import os
    import subprocess
    import sys

    path, ref, tok = checkpoint_factory("score", arch="llama")
    items = groups(len(tok), seed=11)
    expected = [reference_reward(ref, seq) for seq in items]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}

    def score(**extra_env) -> dict:
        run = subprocess.run(
            [sys.executable, "-c", SCORE_IN_A_PROCESS, str(path), json.dumps(items)],
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout.strip().splitlines()[-1])

    built = score()  # compiles at this CPU's own capability and fills the cache
    assert built["compiled"] > 0 and built["rewards"] == pytest.approx(expected, abs=FP32_TOL)
    foreign = score(ATEN_CPU_CAPABILITY="avx2")
    assert foreign["rewards"] == pytest.approx(expected, abs=FP32_TOL)
