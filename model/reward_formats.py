"""Which kind of reward model a checkpoint is, read from its ``config.json``, its weights' names and the model's
settings (never from its code: ``trust_remote_code`` stays off).

An **outcome** reward model gives an item one reward, read at its last token. A **process** reward model (PRM) gives
one reward per step of a solution, read at the step separator that follows each step (``POST /v1/steps``):

* sequence classification, value head (outcome; the default): ``Linear(h, 1)``, raw, at the last token;
* multi-attribute (``*ForSequenceClassification`` with several labels, outcome): ``Linear(h, k)``, each output by its
  ``id2label`` name, and the reward their weighted sum (``attribute_weights``; default their mean);
* Qwen2.5-Math-RM (``Qwen2ForRewardModel``, outcome; ``score.0`` + ``score.2`` weights): ``Linear → ReLU →
  Linear(·, 1)``, raw, at the last token;
* Qwen2.5-Math-PRM (``*ForProcessRewardModel``): ``Linear → ReLU → Linear(·, 2)``, softmax[1], separator
  ``<extra_0>``;
* TRL ``PRMTrainer`` (``*ForTokenClassification`` with 2 labels): ``Linear(h, 2)``, softmax[1], separator ``\\n``
  (TRL labels each step's last token, the separator it appends);
* Math-Shepherd (a causal LM; ``step_label_tokens`` set, e.g. ``+,-``): the ``lm_head`` rows of the good and bad
  label tokens, P(good) over the two, separator ``ки``;
* a value-head PRM (``reward_kind: process``, or ``step_separator`` set, on a one-output head): ``Linear(h, 1)``,
  sigmoid, separator ``\\n``;
* a verdict-token judge (a causal LM; ``verdict_tokens`` set, e.g. ``Yes,No``, outcome): the ``lm_head`` rows of the
  verdict tokens, the first one's probability at the last token (softmax over just those, or with
  ``verdict_softmax: false`` over the whole vocabulary: then every row).

Example::

    fmt = detect_format(json.loads((model_dir / "config.json").read_text()), spec, has_score_mlp(model_dir))
    fmt.process, fmt.step_separator      # True, "<extra_0>"
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import ModelLoadError
from .spec import ModelSpec


@dataclass(frozen=True)
class RewardFormat:
    """How a checkpoint's head turns hidden states into rewards, and whether it scores steps."""

    name: str
    process: bool
    outputs: int  # outputs of the head's last layer
    readout: str  # heads.READOUTS: raw, sigmoid, softmax
    label: int = 0  # softmax: the output whose probability is the reward
    step_separator: str | None = None
    label_tokens: tuple[str, ...] | None = None  # causal-LM PRM: good, bad; a judge: its verdict tokens
    whole_vocabulary: bool = False  # a judge's reward is P(first verdict token) under the whole vocabulary
    attributes: tuple[str, ...] = ()  # multi-attribute: the outputs' names
    weights: tuple[float, ...] = ()  # multi-attribute: their weights in the reward

    @property
    def kind(self) -> str:
        return "process" if self.process else "outcome"


def detect_format(config: dict[str, Any], spec: ModelSpec, has_score_mlp: bool) -> RewardFormat:
    """The format of a checkpoint whose ``config.json`` is ``config``; ``has_score_mlp``: its weights hold the
    two-layer ``score`` head. ``spec.reward_kind`` forces outcome or process where both could be meant."""
    architectures = [str(a) for a in config.get("architectures") or []]
    # transformers writes neither num_labels nor id2label when they are its default, two labels
    labels = int(config.get("num_labels") or len(config.get("id2label") or {}) or 2)
    named_prm = any(a.endswith("ForProcessRewardModel") for a in architectures)
    token_classifier = any(a.endswith("ForTokenClassification") for a in architectures) and labels == 2
    wants_process = spec.reward_kind == "process" or (
        spec.reward_kind == "auto" and (spec.step_label_tokens is not None or spec.step_separator is not None)
    )
    if spec.reward_kind == "outcome" and (named_prm or token_classifier or spec.step_label_tokens is not None):
        raise ModelLoadError(f"reward_kind 'outcome' but the checkpoint is a process reward model ({architectures})")

    def prm(name: str, outputs: int, readout: str, separator: str, label: int = 0, tokens=None) -> RewardFormat:
        return RewardFormat(name, True, outputs, readout, label, spec.step_separator or separator, tokens)

    if spec.verdict_tokens is not None:
        if spec.step_label_tokens is not None or spec.reward_kind == "process":
            raise ModelLoadError("verdict_tokens serves an outcome judge; it does not go with step_label_tokens")
        tokens = tuple(spec.verdict_tokens.split(","))
        judge = RewardFormat("verdict-judge", False, len(tokens), "softmax", 0, label_tokens=tokens)
        return dataclasses.replace(judge, whole_vocabulary=not spec.verdict_softmax)
    if spec.step_label_tokens is not None:
        good, bad = spec.step_label_tokens.split(",")
        return prm("causal-lm-prm", 2, "softmax", "ки", label=0, tokens=(good, bad))
    if named_prm:
        if not has_score_mlp:
            raise ModelLoadError(f"{architectures[0]} without the two-layer score head (score.0, score.2)")
        return prm("process-reward-model", 2, "softmax", "<extra_0>", label=1)
    if token_classifier:
        return prm("token-classification-prm", 2, "softmax", "\n", label=1)
    if wants_process:
        return prm("value-head-prm", 1, "sigmoid", "\n")
    if has_score_mlp:
        return RewardFormat("reward-model-mlp", False, 1, "raw")
    if any(a.endswith("ForSequenceClassification") for a in architectures) and labels > 1:
        names = _label_names(config, labels)
        weights = _weights(names, spec)
        return RewardFormat("multi-attribute", False, labels, "weighted", attributes=names, weights=weights)
    return RewardFormat("outcome", False, 1, "raw")


def _label_names(config: dict[str, Any], labels: int) -> tuple[str, ...]:
    id2label = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    return tuple(id2label.get(k, f"LABEL_{k}") for k in range(labels))


def _weights(names: tuple[str, ...], spec: ModelSpec) -> tuple[float, ...]:
    if spec.attribute_weights is None:
        return tuple(1.0 / len(names) for _ in names)
    unknown = sorted(set(spec.attribute_weights) - set(names))
    if unknown:
        raise ModelLoadError(f"attribute_weights names {unknown}, which the checkpoint does not have: {list(names)}")
    return tuple(float(spec.attribute_weights.get(name, 0.0)) for name in names)


def separator_id(tokenizer: Any, text: str) -> int:
    """The one token id of ``text`` in ``tokenizer`` (an added token, or text that tokenizes to one token)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return int(ids[0])
    vocab_id = tokenizer.convert_tokens_to_ids(text)
    if isinstance(vocab_id, int) and vocab_id != tokenizer.unk_token_id and vocab_id is not None:
        return vocab_id
    raise ModelLoadError(f"{text!r} is not one token of this tokenizer ({ids}); set a one-token value")
