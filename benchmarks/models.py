"""The models the benchmarks run: the demo model, "bench-20M" (CPU), "8B-shape" and "Qwen3-0.6B-shape" (GPU), random
weights.

* ``bench-20M``: LLaMA, hidden 512, 6 layers, 8 heads, intermediate 1376, vocab 32,000 (19.0M non-embedding
  parameters). Saved once as a real checkpoint (``LlamaForSequenceClassification``, head ``score``, the demo's
  tokenizer) under the rmserve cache, so the engine benchmark, rmserve and the baseline all load the same weights.
* ``8B-shape``: Llama-3-8B dimensions (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14,336,
  vocab 128,256), random weights initialised directly on the GPU in the benchmark dtype (seconds, not minutes).
* ``Qwen3-0.6B-shape``: Qwen3-0.6B dimensions (hidden 1024, 28 layers, 16 heads, 8 KV heads, head_dim 128,
  intermediate 3,072, vocab 151,936, tied embeddings; 0.44B non-embedding parameters), as a
  ``Qwen3ForSequenceClassification`` (``Qwen2ForSequenceClassification`` on a transformers without Qwen3, whose
  heads are then hidden / heads = 64 wide) with the demo's tokenizer (its 768 ids are all inside the vocab).
* ``tiny-1L`` and ``tiny-qwen3``: one layer, width 64, the demo's vocab (768): the serving path with a forward that
  costs nothing (the peer comparison; CPU smoke runs of the GPU pass).

Checkpoints written with ``--out`` record the architecture in their ``config.json``; ``--layers N`` keeps the shape's
width but only ``N`` decoder layers (a smaller, quicker checkpoint: say so wherever its numbers are quoted).

Example::

    python -m rmserve.benchmarks.models bench-20M              # prints the checkpoint directory
    python -m rmserve.benchmarks.models 8B-shape --out /scratch/rm-8b --dtype bf16   # 16 GB, for int8/servers
    python -m rmserve.benchmarks.models Qwen3-0.6B-shape --out /scratch/rm-qwen3 --dtype bf16   # 1.2 GB
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import tempfile
from pathlib import Path

import torch

from .flops import DecoderShape

CONFIGS: dict[str, dict] = {
    "tiny-1L": dict(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=176, vocab_size=768, max_position_embeddings=4096,
    ),
    "bench-20M": dict(
        hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
        intermediate_size=1376, vocab_size=32000, max_position_embeddings=4096,
    ),
    "8B-shape": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
    ),
    "Qwen3-0.6B-shape": dict(
        hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        intermediate_size=3072, vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    "tiny-qwen3": dict(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        intermediate_size=128, vocab_size=768, max_position_embeddings=4096, tie_word_embeddings=True,
    ),
}  # fmt: skip
FAMILIES = {"Qwen3-0.6B-shape": "qwen3", "tiny-qwen3": "qwen3"}  # the rest: "llama"
BENCH_CHECKPOINT_VERSION = "v1"
MARKER = "rmserve_bench.json"
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def llama_config(name: str, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(**CONFIGS[name], **extra)


def qwen3_config_class():
    """``Qwen3Config`` when this transformers has ``Qwen3ForSequenceClassification``, else ``Qwen2Config`` (no
    ``head_dim``: its heads are hidden / heads wide)."""
    import transformers

    if hasattr(transformers, "Qwen3ForSequenceClassification"):
        return transformers.Qwen3Config
    return transformers.Qwen2Config


def model_config(name: str, *, layers: int | None = None, **extra):
    """The transformers config of ``name`` (LLaMA, or Qwen3 for the ``FAMILIES`` entries); ``layers``: only that many
    decoder layers."""
    fields = {**CONFIGS[name], **({"num_hidden_layers": layers} if layers else {})}
    if FAMILIES.get(name) == "qwen3":
        config_class = qwen3_config_class()
        if config_class.model_type != "qwen3":
            fields.pop("head_dim", None)
        return config_class(**fields, **extra)
    from transformers import LlamaConfig

    return LlamaConfig(**fields, **extra)


def decoder_shape(name: str) -> DecoderShape:
    return DecoderShape.from_config(model_config(name))


def random_engine(name: str, dtype: str, device: str, max_batch_tokens: int):
    """A ``ScoringEngine`` over a randomly initialised backbone, built directly on ``device`` in ``dtype``."""
    from transformers import AutoModel

    from rmserve.model import ScoringEngine

    config = model_config(name)
    torch.manual_seed(0)
    with torch.device(device):
        backbone = AutoModel.from_config(config, dtype=TORCH_DTYPES[dtype], attn_implementation="sdpa").eval()
        head = torch.nn.Linear(config.hidden_size, 1, bias=False, dtype=torch.float32)
    return ScoringEngine(backbone, head, max_batch_tokens=max_batch_tokens, device=device)


def save_random_checkpoint(
    name: str, out_dir: Path, *, seed: int = 0, device: str = "cpu", dtype: str = "fp32", layers: int | None = None
) -> Path:
    """Write ``name`` with random weights as a ``*ForSequenceClassification`` checkpoint (LLaMA, or Qwen3 for the
    Qwen3 shapes; head ``score``, one label) + the demo tokenizer; ``layers``: only that many decoder layers.

    Built on ``device`` in ``dtype`` (an 8B-shape checkpoint: ``device="cuda", dtype="bf16"``, 16 GB on disk).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rmserve.model.demo import ensure_demo_model
    from rmserve.model.loading import quiet_transformers

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_demo_model()))
    # Pad with <unk>: random token ids start at 2, so the baseline's "rightmost non-pad token" is the last real one.
    tokenizer.pad_token = tokenizer.unk_token
    config = model_config(
        name, layers=layers, num_labels=1, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForSequenceClassification.from_config(config, dtype=TORCH_DTYPES[dtype]).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # a visible reward scale
    with quiet_transformers():
        model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def ensure_bench_checkpoint(name: str = "bench-20M", cache_dir: Path | None = None) -> Path:
    """The cached checkpoint directory of ``name``, written on first use (safe when processes race)."""
    from rmserve.model.demo import cache_root

    target = (cache_dir or cache_root()) / f"{name.lower()}-{BENCH_CHECKPOINT_VERSION}"
    if (target / MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / MARKER).exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            save_random_checkpoint(name, tmp)
            (tmp / MARKER).write_text(json.dumps({"config": name, "version": BENCH_CHECKPOINT_VERSION}))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(name: str) -> Path:
    """A checkpoint directory for ``demo``, a bench config name, or a path."""
    if name == "demo":
        from rmserve.model.demo import ensure_demo_model

        return ensure_demo_model()
    if name in CONFIGS:
        return ensure_bench_checkpoint(name)
    return Path(name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", choices=sorted(CONFIGS))
    parser.add_argument("--out", default=None, help="write here instead of the cache (built on CUDA when present)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(TORCH_DTYPES), help="weights dtype with --out")
    parser.add_argument("--layers", type=int, default=None, help="with --out: only this many decoder layers")
    parser.add_argument("--device", default=None, help="with --out: where the weights are built (default: CUDA if any)")
    args = parser.parse_args(argv)
    if args.layers is not None and not args.out:
        parser.error("--layers needs --out (the cached checkpoints keep their shape)")
    if args.out:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = save_random_checkpoint(args.config, Path(args.out), device=device, dtype=args.dtype, layers=args.layers)
    else:
        path = ensure_bench_checkpoint(args.config)
    print(path)


if __name__ == "__main__":
    main()
