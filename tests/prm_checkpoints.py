"""Tiny real checkpoints of the reward-model formats of ``rmserve.model.reward_formats`` (real ``save_pretrained``,
the locally trained test tokenizer), each with a plain ``transformers`` + torch reference that gives the reward at
**every** position of one unpadded sequence (a multi-attribute checkpoint's: its attributes at the last token).

Example::

    out, reference, tok = save_format_checkpoint(tmp / "prm", "qwen2_prm")
    reference(ids)[p]     # the step reward a separator at position p gets
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from checkpoints import _config, build_tokenizer
from safetensors.torch import load_file, save_file

FORMATS = ("qwen2_rm", "qwen2_prm", "math_shepherd", "token_classification", "value_head_prm")
SEPARATORS = {"qwen2_prm": "<extra_0>", "math_shepherd": "ки", "token_classification": "\n", "value_head_prm": "\n"}
LABEL_TOKENS = "+,-"  # Math-Shepherd's good and bad labels


def _mlp_model_class(outputs: int):
    """Qwen2ForRewardModel / Qwen2ForProcessRewardModel as their published code builds them: a Qwen2 backbone
    (``model``) and ``score = Linear(h, h) → ReLU → Linear(h, outputs)``. The class name is the architecture
    ``save_pretrained`` writes."""
    from transformers import Qwen2Model, Qwen2PreTrainedModel

    class _MLPRewardModel(Qwen2PreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            self.model = Qwen2Model(config)
            hidden = config.hidden_size
            self.score = torch.nn.Sequential(
                torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, outputs)
            )
            self.post_init()

        def forward(self, input_ids):
            return self.score(self.model(input_ids=input_ids).last_hidden_state)

    _MLPRewardModel.__name__ = "Qwen2ForRewardModel" if outputs == 1 else "Qwen2ForProcessRewardModel"
    return _MLPRewardModel


def save_format_checkpoint(
    out: Path, fmt: str, seed: int = 0
) -> tuple[Path, Callable[[list[int]], torch.Tensor], object]:
    """Write a ``fmt`` checkpoint; return ``(dir, reference, tokenizer)``, ``reference(ids)`` the reward at every
    position of the unpadded sequence ``ids`` (fp32)."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    out = Path(out)
    tok = build_tokenizer("chat")
    if fmt == "qwen2_prm":
        tok.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    if fmt == "math_shepherd":
        tok.add_tokens(["ки"])
    tok.save_pretrained(str(out))
    arch = "qwen2" if fmt.startswith("qwen2") else "llama"
    config = _config(arch, len(tok), tok)
    torch.manual_seed(seed)

    if fmt in ("qwen2_rm", "qwen2_prm"):
        model = _mlp_model_class(1 if fmt == "qwen2_rm" else 2)(config).eval()
        with torch.no_grad():
            for layer in (model.score[0], model.score[2]):
                layer.weight.normal_(0, 0.3)  # step probabilities away from 0 and 1, so they differ visibly
                layer.bias.normal_(0, 0.1)
        model.save_pretrained(str(out))

        def reference(ids):
            with torch.no_grad():
                logits = model(torch.tensor([list(ids)]))[0].float()
            return logits[:, 0] if fmt == "qwen2_rm" else torch.softmax(logits, dim=-1)[:, 1]

        return out, reference, tok

    if fmt == "token_classification":
        config.num_labels = 2
        model = AutoModelForTokenClassification.from_config(config).eval()
        with torch.no_grad():
            model.score.weight.normal_(0, 0.15)
        model.save_pretrained(str(out))

        def reference(ids):
            with torch.no_grad():
                logits = model(torch.tensor([list(ids)])).logits[0].float()
            return torch.softmax(logits, dim=-1)[:, 1]

        return out, reference, tok

    model = AutoModelForCausalLM.from_config(config).eval()
    if fmt == "math_shepherd":
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.15)
        model.save_pretrained(str(out))
        good, bad = (tok.convert_tokens_to_ids(t) for t in LABEL_TOKENS.split(","))

        def reference(ids):
            with torch.no_grad():
                logits = model(torch.tensor([list(ids)])).logits[0].float()
            return torch.softmax(logits[:, [good, bad]], dim=-1)[:, 0]

        return out, reference, tok

    if fmt == "value_head_prm":
        model.save_pretrained(str(out))
        head = torch.randn(1, config.hidden_size) * 0.15
        weights = load_file(str(out / "model.safetensors"))
        weights["v_head.weight"] = head
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})

        def reference(ids):
            with torch.no_grad():
                hidden = model.model(input_ids=torch.tensor([list(ids)])).last_hidden_state[0].float()
            return torch.sigmoid(hidden @ head[0])

        return out, reference, tok
    raise ValueError(f"unknown format {fmt!r}")


def format_settings(fmt: str) -> dict:
    """The model settings a format needs beyond its checkpoint (the rest is detected)."""
    return {"math_shepherd": {"step_label_tokens": LABEL_TOKENS}, "value_head_prm": {"reward_kind": "process"}}.get(
        fmt, {}
    )


ATTRIBUTES = ("helpfulness", "correctness", "verbosity")


def save_attribute_checkpoint(out: Path, names: tuple[str, ...] = ATTRIBUTES, seed: int = 3):
    """A multi-attribute ``LlamaForSequenceClassification`` (one label per name, ``id2label`` set); returns
    ``(dir, reference)``, ``reference(ids)`` the logits of the unpadded sequence's last token."""
    from transformers import AutoModelForSequenceClassification

    tok = build_tokenizer("chat")
    config = _config("llama", len(tok), tok)
    config.num_labels = len(names)
    config.id2label = dict(enumerate(names))
    config.label2id = {name: k for k, name in enumerate(names)}
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    model.config.pad_token_id = None  # the reference scores one unpadded sequence: its last token

    def reference(ids) -> list[float]:
        with torch.no_grad():
            return model(torch.tensor([list(ids)])).logits[0].tolist()

    return Path(out), reference
