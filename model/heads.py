"""Find a checkpoint's reward head among its safetensors tensors.

Accepted layouts: ``score`` (``*ForSequenceClassification``, TRL, OpenRLHF exports), ``reward_head``
(``LlamaRewardModel``: a causal LM + ``Linear(hidden, 1, bias=False)``), ``v_head`` (DeepSpeed-Chat),
``value_head`` (OpenRLHF ``value_head_prefix``) — in the model's own weight files or in a separate
``<name>.safetensors`` file (or ``head_file``) holding ``weight`` / ``bias`` or ``<name>.weight``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import ModelLoadError

HEAD_NAMES = ("score", "reward_head", "v_head", "value_head")


@dataclass(frozen=True)
class RewardHead:
    name: str
    source: str  # file the weights came from
    weight: torch.Tensor  # (1, hidden)
    bias: torch.Tensor | None

    def to_linear(self, device: torch.device | str) -> torch.nn.Linear:
        """The head as an fp32 ``nn.Linear`` (never quantised)."""
        hidden = self.weight.shape[-1]
        linear = torch.nn.Linear(hidden, 1, bias=self.bias is not None, dtype=torch.float32)
        with torch.no_grad():
            linear.weight.copy_(self.weight.reshape(1, hidden).float())
            if self.bias is not None:
                linear.bias.copy_(self.bias.reshape(1).float())
        return linear.to(device).eval()


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors shards (single file or an index)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    return [single] if single.exists() else sorted(model_dir.glob("model*.safetensors"))


def tensor_names(files: list[Path]) -> dict[str, Path]:
    names: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                names[key] = f
    return names


def _match(names: dict[str, Path], head: str) -> str | None:
    """The weight key of ``head``: ``<head>.weight`` at top level, or under one prefix (``model.v_head``)."""
    exact = f"{head}.weight"
    if exact in names:
        return exact
    nested = [k for k in names if k.endswith(f".{exact}") and k.count(".") == 2]
    return nested[0] if len(nested) == 1 else None


def _load(file: Path, weight_key: str, name: str, hidden_size: int) -> RewardHead:
    bias_key = weight_key[: -len("weight")] + "bias"
    with safe_open(str(file), framework="pt") as handle:
        weight = handle.get_tensor(weight_key)
        bias = handle.get_tensor(bias_key) if bias_key in handle.keys() else None  # noqa: SIM118
    if weight.numel() != hidden_size or (weight.dim() == 2 and weight.shape[0] != 1):
        raise ModelLoadError(
            f"reward head '{weight_key}' in {file.name} has shape {tuple(weight.shape)}; "
            f"expected (1, {hidden_size}) — is this a reward model with one output?"
        )
    return RewardHead(name=name, source=file.name, weight=weight, bias=bias)


def find_reward_head(
    model_dir: Path, hidden_size: int, *, requested: str = "auto", head_file: str | None = None
) -> RewardHead:
    """Locate and load the reward head, or raise ``ModelLoadError`` naming the tensors that were found."""
    candidates = HEAD_NAMES if requested == "auto" else (requested,)
    extra_files: list[Path] = []
    if head_file:
        path = Path(head_file) if Path(head_file).is_absolute() else model_dir / head_file
        if not path.exists():
            raise ModelLoadError(f"head_file {path} does not exist")
        extra_files.append(path)
    extra_files += [model_dir / f"{n}.safetensors" for n in candidates if (model_dir / f"{n}.safetensors").exists()]

    for f in extra_files:  # a separate head file wins over weights inside the model
        names = tensor_names([f])
        for head in candidates:
            key = _match(names, head)
            if key:
                return _load(f, key, head, hidden_size)
        if "weight" in names:
            stem = f.stem if f.stem in HEAD_NAMES else (requested if requested != "auto" else f.stem)
            return _load(f, "weight", stem, hidden_size)

    names = tensor_names(weight_files(model_dir))
    for head in candidates:
        key = _match(names, head)
        if key:
            return _load(names[key], key, head, hidden_size)

    non_layer = sorted(k for k in names if ".layers." not in k)
    raise ModelLoadError(
        f"no reward head {list(candidates)} found in {model_dir}; tensors outside the transformer layers: "
        f"{non_layer[:20]}{' ...' if len(non_layer) > 20 else ''}. Name the head with `head` or `head_file`."
    )
