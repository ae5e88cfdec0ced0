"""``load_checkpoint(model_dir, spec)``: a local checkpoint directory in (safetensors or PyTorch ``.bin`` weights), a
ready ``RewardModel`` out.

Everything about one directory: device and dtype rules, quantisation, the backbone (every weight from the checkpoint
or an error), the reward head, the tokenizer, normalisation. ``loading.load_reward_model`` turns a name (``"demo"``)
or a path into a directory first; the demo model's build evaluates its checkpoint with this.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import torch

from .engine import ScoringEngine
from .errors import ModelLoadError
from .formatting import ItemFormatter
from .heads import find_reward_head, has_score_mlp, label_token_head, tensor_names, weight_files
from .host import host_memory_bytes
from .quiet import quiet_transformers
from .reward_formats import detect_format, separator_id
from .reward_model import Normalization, RewardModel
from .spec import ModelSpec

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MAX_LENGTH_CAP = 8192


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16), from the kernel's CPU flags."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """'auto' → bf16 on CUDA; on CPU, bf16 only when the CPU has bf16 units, else fp32.

    Without bf16 units (e.g. AVX2-only CPUs) bf16 matmuls run about 6x slower than fp32; with them they run
    faster (see benchmarks/README.md). Pass dtype='fp32' for rewards bit-comparable to an fp32 reference.
    """
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bf16"
    return "bf16" if cpu_has_bf16_units() else "fp32"


def resolve_prefix_cache_bytes(requested: int | None, device: torch.device) -> int:
    """The prefix cache's byte budget: as requested, else 10% of the device's memory (the GPU's on CUDA; on CPU the
    host's, or its container's limit, and at least 1 GiB)."""
    if requested is not None:
        return requested
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 10
    return max(1 << 30, host_memory_bytes() // 10)


def read_normalization(model_dir: Path, spec: ModelSpec) -> Normalization | None:
    raw = json.loads((model_dir / "config.json").read_text())
    mean = spec.reward_mean if spec.reward_mean is not None else raw.get("mean", raw.get("reward_mean"))
    std = spec.reward_std if spec.reward_std is not None else raw.get("std", raw.get("reward_std"))
    if mean is None and std is None:
        return None
    std = 1.0 if std is None else float(std)
    if not std > 0:
        raise ModelLoadError(f"normalisation std must be > 0, got {std}")
    return Normalization(mean=float(mean or 0.0), std=std)


def _quantization_config(spec: ModelSpec, dtype: torch.dtype):
    if spec.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if spec.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=False
    )


# Backbone weights a trainer saved under its own wrapper's attribute, read as the decoder's ``model.``: DeepSpeed-Chat's
# ``RewardModel`` keeps the decoder in ``rwtranrsformer`` (sic) beside its ``v_head``.
TRAINER_PREFIXES = ("rwtranrsformer.",)


def load_backbone(model_dir: Path, spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The decoder without any head (``AutoModel``), every weight loaded from the checkpoint or an error."""
    from transformers import AutoModel

    quant = _quantization_config(spec, dtype)
    # safetensors where the checkpoint has them, else its .bin files (transformers reads those weights-only)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code}
    names = tensor_names(weight_files(model_dir))
    prefixes = [p for p in TRAINER_PREFIXES if any(name.startswith(p) for name in names)]
    if prefixes:
        kwargs["key_mapping"] = {f"^{re.escape(p)}": "model." for p in prefixes}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": str(device)})
    try:
        with quiet_transformers():
            backbone, info = AutoModel.from_pretrained(str(model_dir), output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not load the backbone from {model_dir}: {exc}") from exc
    missing = [k for k in info.get("missing_keys", []) if "rotary_emb" not in k]
    if missing:
        raise ModelLoadError(
            f"checkpoint {model_dir} lacks backbone weights {sorted(missing)[:10]}; refusing to score with "
            "randomly initialised layers"
        )
    if quant is None:
        backbone = backbone.to(device)
    elif spec.quantization == "nf4" and device.type == "cpu":
        _avoid_unsupported_cpu_4bit_packing(backbone)
    return backbone.eval()


def _avoid_unsupported_cpu_4bit_packing(backbone: torch.nn.Module) -> None:
    """bitsandbytes' packed CPU 4-bit kernel needs ``out_features % 32 == 0`` and whole 64-blocks per row;
    other layers take its generic path."""
    for module in backbone.modules():
        if hasattr(module, "support_avx512bf16_for_cpu") and (module.out_features % 32 or module.in_features % 64):
            module.support_avx512bf16_for_cpu = False


def load_checkpoint(model_dir: Path, spec: ModelSpec) -> RewardModel:
    """A ``RewardModel`` from the checkpoint directory ``model_dir``, loaded as ``spec`` says (its ``path`` only
    names the model: ``"demo"`` gives the id ``rmserve-demo``)."""
    from transformers import AutoConfig, AutoTokenizer

    if not weight_files(model_dir):
        raise ModelLoadError(
            f"no weights in {model_dir}: expected model.safetensors, pytorch_model.bin, or their shards and index"
        )
    device = resolve_device(spec.device)
    dtype_name = resolve_dtype(spec.dtype, device)
    if spec.quantization != "none" and dtype_name == "fp16" and device.type == "cpu":
        dtype_name = "fp32"
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=spec.trust_remote_code)
    hidden = getattr(config, "hidden_size", None)
    if hidden is None:
        raise ModelLoadError(f"config of {model_dir} has no hidden_size; not a decoder checkpoint rmserve knows")
    raw_config = json.loads((model_dir / "config.json").read_text())
    reward_format = detect_format(raw_config, spec, has_score_mlp(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=spec.trust_remote_code)
    step_separator_id = None
    if reward_format.step_separator is not None:
        step_separator_id = separator_id(tokenizer, reward_format.step_separator)
    label = reward_format.label
    if reward_format.name == "verdict-judge":  # the whole lm_head, for the label tokens a request names
        labels = tuple(separator_id(tokenizer, token) for token in reward_format.label_tokens or ())
        vocabulary = label_token_head(model_dir, hidden, None)
        if reward_format.whole_vocabulary:  # every row of lm_head; the reward is the first label's probability
            head, label = vocabulary, labels[0]
        else:
            head = dataclasses.replace(vocabulary, layers=((vocabulary.layers[0][0][list(labels)], None),))
        head = dataclasses.replace(head, vocabulary=vocabulary.layers[0][0])
    elif reward_format.label_tokens is not None:
        labels = tuple(separator_id(tokenizer, token) for token in reward_format.label_tokens)
        head = label_token_head(model_dir, hidden, labels)
    else:
        head = find_reward_head(
            model_dir, hidden, requested=spec.head, head_file=spec.head_file, outputs=reward_format.outputs
        )
    head = head.reading(reward_format.readout, label, reward_format.attributes, reward_format.weights)
    backbone = load_backbone(model_dir, spec, device, DTYPES[dtype_name])

    context = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH_CAP
    max_length = spec.max_length or min(context, DEFAULT_MAX_LENGTH_CAP)
    # Valid ids are those the embedding table has rows for.
    formatter = ItemFormatter(
        tokenizer, spec, max_length=max_length, vocab_size=config.vocab_size, step_separator_id=step_separator_id
    )
    engine = ScoringEngine(
        backbone,
        head.to_module(device),
        max_batch_tokens=spec.max_batch_tokens,
        padding_side=spec.padding_side,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        device=device,
        prefix_sharing=spec.prefix_sharing == "on",
        prefix_cache_bytes=resolve_prefix_cache_bytes(spec.prefix_cache_bytes, device),
        reward_cache_items=spec.reward_cache_items,
        batch_invariant=spec.batch_invariant,
        compile=spec.compile,
    )
    if spec.forward_overhead_tokens is not None:
        engine.overhead_tokens = spec.forward_overhead_tokens
    else:
        engine.calibrate()
    model_id = "rmserve-demo" if spec.path == "demo" else model_dir.name
    log.info(
        "loaded reward model %s (%s, %s, head %s from %s) on %s",
        model_id,
        reward_format.name,
        dtype_name,
        head.name,
        head.source,
        device,
    )
    return RewardModel(
        spec=spec,
        model_id=model_id,
        formatter=formatter,
        engine=engine,
        dtype=dtype_name,
        head_name=head.name,
        normalization=read_normalization(model_dir, spec),
        path=model_dir,
        reward_format=reward_format,
    )
