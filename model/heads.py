"""Find a checkpoint's reward head among its weight tensors (safetensors, or PyTorch ``.bin``), and build it as
the fp32 module the engine runs.

Accepted layouts: ``score`` (``*ForSequenceClassification``, TRL, OpenRLHF exports; ``*ForTokenClassification``
with two labels), ``reward_head`` (``LlamaRewardModel``: a causal LM + ``Linear(hidden, 1, bias=False)``), ``v_head``
(DeepSpeed-Chat), ``value_head`` (OpenRLHF ``value_head_prefix``) — in the model's own weight files or in a separate
``<name>.safetensors`` file (or ``head_file``) holding ``weight`` / ``bias`` or ``<name>.weight``; the two-layer
``score`` MLP of Qwen2.5-Math-RM / -PRM (``score.0`` → ReLU → ``score.2``); and for a causal-LM process reward model
the rows of ``lm_head`` (or the tied embeddings) that give its label tokens' logits; a judge's head also holds the whole
``lm_head`` (``Vocabulary``, in the checkpoint's dtype), from which ``label_probabilities`` reads the label tokens a
request names.

How the head's outputs become one number (``readout``): ``raw`` (its one output), ``sigmoid`` (of its one output),
``softmax`` (the probability of output ``label`` over its outputs) or ``weighted`` (a multi-attribute head: the
weighted sum of its outputs, each kept by name on the ``AttributedReward``). ``reward_formats.py`` decides which.

Example::

    head = find_reward_head(model_dir, hidden_size=4096)       # RewardHead(name="score", layers=((w, b),), ...)
    module = head.to_module("cuda")                             # nn.Linear for one linear layer, else ScoreHead
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import ModelLoadError
from .invariant import fixed_elementwise, fixed_order_sum, fixed_rows_linear, head_rewards

HEAD_NAMES = ("score", "reward_head", "v_head", "value_head")
READOUTS = ("raw", "sigmoid", "softmax", "weighted")

Layer = tuple[torch.Tensor, "torch.Tensor | None"]  # a Linear's weight (out, in) and bias


@dataclass(frozen=True)
class RewardHead:
    """A head's weights as read from the checkpoint: linear layers with a ReLU between them, and its readout."""

    name: str
    source: str  # file the weights came from
    layers: tuple[Layer, ...]
    readout: str = "raw"
    label: int = 0  # softmax: which output's probability is the reward
    attributes: tuple[str, ...] = ()  # weighted: each output's name
    weights: tuple[float, ...] = ()  # weighted: each output's weight in the reward
    # A judge's whole ``lm_head`` (vocab, hidden): per-request label tokens are read from it (``label_probabilities``)
    vocabulary: torch.Tensor | None = None

    @property
    def outputs(self) -> int:
        return int(self.layers[-1][0].shape[0])

    def reading(
        self, readout: str, label: int = 0, attributes: tuple[str, ...] = (), weights: tuple[float, ...] = ()
    ) -> RewardHead:
        """The same weights, read another way."""
        return dataclasses.replace(self, readout=readout, label=label, attributes=attributes, weights=weights)

    def to_module(self, device: torch.device | str) -> torch.nn.Module:
        """The head in fp32 (never quantised): a plain ``nn.Linear(hidden, 1)`` for one linear layer read raw (the
        common case), else a ``ScoreHead``. Either maps ``[n, hidden]`` to ``[n, 1]``."""
        linears = [_linear(weight, bias) for weight, bias in self.layers]
        if len(linears) == 1 and self.readout == "raw":
            return linears[0].to(device).eval()
        head = ScoreHead(linears, self.readout, self.label, attributes=self.attributes, weights=self.weights)
        if self.vocabulary is not None:  # a submodule: it moves with the head (sleep) and is reloaded with it
            same = self.vocabulary is self.layers[0][0]  # the reward reads the whole vocabulary too: share its weight
            head.vocabulary = Vocabulary(linears[0].weight if same else self.vocabulary)
        return head.to(device).eval()


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    """An fp32 ``nn.Linear`` holding ``weight`` (out, in) and ``bias``."""
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=torch.float32)
    with torch.no_grad():
        linear.weight.copy_(weight.float())
        if bias is not None:
            linear.bias.copy_(bias.reshape(-1).float())
    return linear


class Vocabulary(torch.nn.Module):
    """A judge's whole ``lm_head`` (``[vocab, hidden]``), kept in the checkpoint's dtype: in fp32 a 152k x 3584 head
    would take 2.2 GB more. Logits are computed in fp32 a block of ``BLOCK_ROWS`` vocabulary rows at a time (a bf16
    or fp16 weight converts to fp32 exactly), so the numbers are those of an fp32 head.

    It moves with the head (``.to(device)``, sleep) but keeps its dtype when the head is made fp32 (``.float()``)."""

    BLOCK_ROWS = 16384

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        # The head's own Parameter when it shares one (moved once by sleep), else the checkpoint's tensor.
        self.weight = weight if isinstance(weight, torch.nn.Parameter) else torch.nn.Parameter(weight, False)

    def _apply(self, fn, recurse=True):  # noqa: ARG002 (torch's signature)
        """Device moves apply; dtype casts (the runner's ``head.float()``) do not."""
        dtype = self.weight.dtype
        target = fn(torch.empty(0, dtype=dtype, device=self.weight.device)).device
        self.weight.data = self.weight.data.to(target)
        return self

    def logits(self, x: torch.Tensor, ids: torch.Tensor | None = None, *, invariant: bool = False) -> torch.Tensor:
        """fp32 logits ``[n, vocab]`` of fp32 hidden states ``x`` ``[n, hidden]``; only the ``ids`` columns when
        given. ``invariant``: each block through the fixed-shape matmul of batch-invariant mode."""
        weight = self.weight if ids is None else self.weight[ids]
        blocks = []
        for first in range(0, weight.shape[0], self.BLOCK_ROWS):
            block = weight[first : first + self.BLOCK_ROWS].float()
            blocks.append(fixed_rows_linear(x, block, None) if invariant else x @ block.t())
        return torch.cat(blocks, dim=-1)


def label_probabilities(
    vocabulary: Vocabulary,
    hidden: torch.Tensor,
    labels: tuple[int, ...],
    whole_vocabulary: bool,
    *,
    invariant: bool = False,
) -> list[float]:
    """The next-token probability of each of ``labels`` after one position whose hidden state is ``hidden``
    (``[hidden]``), in fp32: under the whole vocabulary (``softmax(logits)[labels]``), or softmax over just those
    labels' logits (``softmax(logits[labels])``, which reads only those rows). One row at a time, so its value never
    depends on its neighbours (``invariant``: the fixed-shape matmul of batch-invariant mode)."""
    x = hidden.float()[None]
    ids = torch.tensor(labels, device=vocabulary.weight.device)
    if whole_vocabulary:
        return torch.softmax(vocabulary.logits(x, invariant=invariant)[0], dim=-1)[ids].tolist()
    return torch.softmax(vocabulary.logits(x, ids, invariant=invariant)[0], dim=-1).tolist()


class AttributedReward(float):
    """A multi-attribute head's reward: the weighted scalar (what ensembles, normalisation and telemetry use), with
    every attribute by name in ``attributes``.

    Example::

        r = AttributedReward(0.7, {"helpfulness": 0.9, "verbosity": 0.3})
        r + 1, r.attributes["helpfulness"]       # 1.7, 0.9
    """

    attributes: dict[str, float]

    def __new__(cls, value: float, attributes) -> AttributedReward:
        reward = super().__new__(cls, value)
        reward.attributes = dict(attributes)
        return reward

    def __reduce__(self):  # across Ray processes, the attributes go too
        return (AttributedReward, (float(self), self.attributes))


class ScoreHead(torch.nn.Module):
    """Linear layers with ReLU between them, then the readout: ``[n, hidden]`` → ``[n, 1]`` rewards (fp32).

    A ``weighted`` head (several named outputs) also gives each output by name (``outputs``)."""

    def __init__(
        self,
        linears: list[torch.nn.Linear],
        readout: str,
        label: int = 0,
        *,
        attributes: tuple[str, ...] = (),
        weights: tuple[float, ...] = (),
    ):
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"unknown readout {readout!r}")
        parts: list[torch.nn.Module] = []
        for k, linear in enumerate(linears):
            parts += [linear] if k == 0 else [torch.nn.ReLU(), linear]
        self.layers = torch.nn.Sequential(*parts)
        self.readout = readout
        self.label = label
        self.attribute_names = tuple(attributes)
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32) if weights else None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._read(self.layers(hidden), torch.sigmoid)

    def outputs(self, hidden: torch.Tensor, *, invariant: bool = False) -> torch.Tensor:
        """The last layer's outputs, ``[n, outputs]`` (a multi-attribute head's attributes)."""
        return self._layers_invariant(hidden) if invariant else self.layers(hidden)

    def forward_invariant(self, hidden: torch.Tensor) -> torch.Tensor:
        """``forward`` with each row computed independently of the others (batch-invariant mode)."""
        x = self._layers_invariant(hidden)
        if self.readout == "weighted":
            return fixed_order_sum(x * self.weights)[:, None]
        if self.readout == "softmax" and x.shape[1] > 2:  # exp and the sum in a fixed order, row by row
            e = fixed_elementwise(torch.exp, x - x.amax(dim=1, keepdim=True))
            return e[:, self.label : self.label + 1] / fixed_order_sum(e)[:, None]
        return self._read(x, lambda t: fixed_elementwise(torch.sigmoid, t))

    def _layers_invariant(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.float()
        for module in self.layers:
            if isinstance(module, torch.nn.Linear) and module.out_features == 1:
                x = head_rewards(module, x)[:, None]
            elif isinstance(module, torch.nn.Linear):
                x = fixed_rows_linear(x, module.weight, module.bias)
            else:
                x = module(x)  # ReLU: exact, elementwise
        return x

    def _read(self, out: torch.Tensor, sigmoid) -> torch.Tensor:
        if self.readout == "raw":
            return out
        if self.readout == "weighted":
            return out @ self.weights[:, None]
        if self.readout == "sigmoid":
            return sigmoid(out)
        if out.shape[1] == 2:  # two classes: softmax(out)[label] = sigmoid(out[label] - out[other])
            return sigmoid(out[:, self.label : self.label + 1] - out[:, 1 - self.label : 2 - self.label])
        return torch.softmax(out, dim=-1)[:, self.label : self.label + 1]


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight shards: safetensors (one file or an index), else PyTorch ``.bin`` ones (one file or an
    index; read with torch's weights-only unpickler, which loads tensors and runs no code)."""
    for index_name, single_name, pattern in (
        ("model.safetensors.index.json", "model.safetensors", "model*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin"),
    ):
        index = model_dir / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [model_dir / s for s in shards]
        single = model_dir / single_name
        found = [single] if single.exists() else sorted(model_dir.glob(pattern))
        if found:
            return found
    return []


class _StateDict:
    """A ``.bin`` file's tensors behind ``safe_open``'s three methods."""

    def __init__(self, file: Path):
        try:
            self._tensors = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # a pickle that holds more than tensors, or not a torch file at all
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            detail = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else repr(exc))
            raise ModelLoadError(
                f"could not read {file.name} as a state dict of tensors ({detail.split(' Please')[0][:300]}); rmserve "
                "runs no code from a checkpoint: save the weights alone (a state dict, or safetensors)"
            ) from exc

    def keys(self):
        return self._tensors.keys()

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def get_slice(self, key: str) -> torch.Tensor:
        return self._tensors[key]


@contextmanager
def open_tensors(file: Path):
    """A weight file's tensors by name (``keys``, ``get_tensor``, ``get_slice``): safetensors, or a ``.bin``."""
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt") as handle:
            yield handle
    else:
        yield _StateDict(file)


def tensor_names(files: list[Path]) -> dict[str, Path]:
    names: dict[str, Path] = {}
    for f in files:
        with open_tensors(f) as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                names[key] = f
    return names


def has_score_mlp(model_dir: Path) -> bool:
    """Whether the weights hold Qwen2.5-Math-RM/-PRM's two-layer ``score`` head (``score.0`` and ``score.2``)."""
    names = tensor_names(weight_files(model_dir))
    return "score.0.weight" in names and "score.2.weight" in names


def _match(names: dict[str, Path], head: str) -> str | None:
    """The weight key of ``head``: ``<head>.weight`` at top level, or under one prefix (``model.v_head``)."""
    exact = f"{head}.weight"
    if exact in names:
        return exact
    nested = [k for k in names if k.endswith(f".{exact}") and k.count(".") == 2]
    return nested[0] if len(nested) == 1 else None


def _read(file: Path, weight_key: str) -> Layer:
    bias_key = weight_key[: -len("weight")] + "bias"
    with open_tensors(file) as handle:
        weight = handle.get_tensor(weight_key)
        bias = handle.get_tensor(bias_key) if bias_key in handle.keys() else None  # noqa: SIM118
    return weight, bias


def _load(file: Path, weight_key: str, name: str, hidden_size: int, outputs: int) -> RewardHead:
    weight, bias = _read(file, weight_key)
    if weight.numel() != outputs * hidden_size or (weight.dim() == 2 and weight.shape[0] != outputs):
        raise ModelLoadError(
            f"reward head '{weight_key}' in {file.name} has shape {tuple(weight.shape)}; "
            f"expected ({outputs}, {hidden_size}) — is this a reward model with {outputs} output(s)?"
        )
    return RewardHead(name=name, source=file.name, layers=((weight.reshape(outputs, hidden_size), bias),))


def _load_mlp(names: dict[str, Path], hidden_size: int, outputs: int) -> RewardHead:
    """``score.0`` (hidden → hidden') → ReLU → ``score.2`` (hidden' → outputs)."""
    first = _read(names["score.0.weight"], "score.0.weight")
    second = _read(names["score.2.weight"], "score.2.weight")
    if first[0].shape[1] != hidden_size or second[0].shape != (outputs, first[0].shape[0]):
        raise ModelLoadError(
            f"the two-layer score head has shapes {tuple(first[0].shape)} and {tuple(second[0].shape)}; expected "
            f"(d, {hidden_size}) and ({outputs}, d)"
        )
    return RewardHead(name="score_mlp", source=names["score.2.weight"].name, layers=(first, second))


def label_token_head(model_dir: Path, hidden_size: int, token_ids: tuple[int, ...] | None) -> RewardHead:
    """A causal LM's logits for ``token_ids`` only: those rows of ``lm_head`` (or of the tied input embeddings); None:
    every row (the whole vocabulary's logits)."""
    names = tensor_names(weight_files(model_dir))
    key = "lm_head.weight" if "lm_head.weight" in names else None
    if key is None:
        tied = [k for k in names if k.endswith("embed_tokens.weight")]
        key = tied[0] if len(tied) == 1 else None
    if key is None:
        raise ModelLoadError(f"no lm_head.weight (nor tied embed_tokens.weight) in {model_dir} to read label logits")
    with open_tensors(names[key]) as handle:
        if token_ids is None:
            weight = handle.get_tensor(key)
        else:
            matrix = handle.get_slice(key)
            weight = torch.cat([matrix[t : t + 1] for t in token_ids])
    if weight.shape[1] != hidden_size:
        raise ModelLoadError(f"{key} has shape {tuple(weight.shape)}; expected (vocab, {hidden_size})")
    return RewardHead(name="lm_head_labels", source=names[key].name, layers=((weight, None),))


def find_reward_head(
    model_dir: Path, hidden_size: int, *, requested: str = "auto", head_file: str | None = None, outputs: int = 1
) -> RewardHead:
    """Locate and load the reward head with ``outputs`` outputs, or raise ``ModelLoadError`` naming the tensors that
    were found."""
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
                return _load(f, key, head, hidden_size, outputs)
        if "weight" in names:
            stem = f.stem if f.stem in HEAD_NAMES else (requested if requested != "auto" else f.stem)
            return _load(f, "weight", stem, hidden_size, outputs)

    names = tensor_names(weight_files(model_dir))
    if requested in ("auto", "score") and "score.0.weight" in names and "score.2.weight" in names:
        return _load_mlp(names, hidden_size, outputs)
    for head in candidates:
        key = _match(names, head)
        if key:
            return _load(names[key], key, head, hidden_size, outputs)

    non_layer = sorted(k for k in names if ".layers." not in k)
    raise ModelLoadError(
        f"no reward head {list(candidates)} found in {model_dir}; tensors outside the transformer layers: "
        f"{non_layer[:20]}{' ...' if len(non_layer) > 20 else ''}. Name the head with `head` or `head_file`."
    )
