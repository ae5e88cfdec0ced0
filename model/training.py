"""Train a small LLaMA reward model from preference data (``rmserve train``, and the demo model).

Records are pairs ``{prompt, chosen, rejected[, margin]}`` or rankings ``{prompt, responses: [best, ..., worst]}``.
The model is a ``LlamaForCausalLM`` plus ``reward_head = Linear(hidden, 1, bias=False)`` (the
``LlamaRewardModel`` layout), saved so that ``load_reward_model`` loads it. Items are formatted by the
same ``ItemFormatter`` the server uses, so training and serving see identical token ids.

Example::

    result = train_reward_model(read_preferences("prefs.jsonl"), Path("my-rm"), TrainConfig(steps=300))
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import InvalidRequestError
from .formatting import ItemFormatter
from .items import Message
from .losses import imitation_loss, listwise_ranking_loss
from .runner import last_token_index
from .spec import ModelSpec
from .tokenizer_builder import train_tokenizer


@dataclass
class TrainConfig:
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 176
    vocab_size: int = 1024
    max_length: int = 256  # longest training sequence
    context_length: int = 2048  # max_position_embeddings written to the checkpoint
    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    beta: float = 0.0  # weight of the imitation (LM) term; 0 disables it
    seed: int = 0


@dataclass
class TrainResult:
    out_dir: Path
    losses: list[float] = field(default_factory=list)


def read_preferences(path: str | Path) -> list[dict]:
    """Read a JSONL preference file; every bad line is reported with its line number."""
    records, problems = [], []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(validate_record(json.loads(line)))
            except (json.JSONDecodeError, ValueError) as exc:
                problems.append(f"line {lineno}: {exc}")
    if problems:
        raise InvalidRequestError(f"{path}: {len(problems)} bad line(s): " + "; ".join(problems[:10]))
    if not records:
        raise InvalidRequestError(f"{path}: no records")
    return records


def validate_record(obj) -> dict:
    """Normalise a record to ``{prompt, responses: [best, ..., worst], margin}``."""
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise ValueError("expected an object with a string 'prompt'")
    if "responses" in obj:
        responses = obj["responses"]
        if not (isinstance(responses, list) and len(responses) >= 2 and all(isinstance(r, str) for r in responses)):
            raise ValueError("'responses' must be a list of at least two strings, best first")
    elif isinstance(obj.get("chosen"), str) and isinstance(obj.get("rejected"), str):
        responses = [obj["chosen"], obj["rejected"]]
    else:
        raise ValueError("expected {prompt, chosen, rejected} or {prompt, responses: [best, ..., worst]}")
    margin = obj.get("margin", 0.0)
    if not isinstance(margin, int | float):
        raise ValueError("'margin' must be a number")
    return {"prompt": obj["prompt"], "responses": responses, "margin": float(margin)}


class _Trainable(torch.nn.Module):
    def __init__(self, causal_lm: torch.nn.Module, hidden: int):
        super().__init__()
        self.lm = causal_lm
        self.reward_head = torch.nn.Linear(hidden, 1, bias=False)

    def forward(self, input_ids, mask, want_lm: bool):
        hidden = self.lm.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        last = hidden[torch.arange(hidden.shape[0]), last_token_index(mask)]
        rewards = self.reward_head(last.float()).squeeze(-1)
        return rewards, (self.lm.lm_head(hidden) if want_lm else None)


def _pad(seqs: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    return ids, mask


def _encode_records(records: list[dict], formatter: ItemFormatter) -> list[dict]:
    encoded = []
    for i, rec in enumerate(records):
        seqs = [formatter.encode({"prompt": rec["prompt"], "response": r}, i).input_ids for r in rec["responses"]]
        prompt_len = len(formatter._render([Message(role="user", content=rec["prompt"])], i, "prompt"))
        encoded.append({"seqs": seqs, "margin": rec["margin"], "prompt_len": prompt_len})
    return encoded


def _group_loss(rewards: torch.Tensor, sizes: list[int], margins: list[float]) -> torch.Tensor:
    groups = list(torch.split(rewards, sizes))
    # K = 2 with a margin is the margin variant; listwise with K = 2 is exactly Bradley–Terry.
    shifted = [g - torch.tensor([m, 0.0]) if len(g) == 2 and m else g for g, m in zip(groups, margins, strict=True)]
    return listwise_ranking_loss(shifted)


def train_reward_model(
    records: list[dict], out_dir: Path, config: TrainConfig | None = None, *, progress: bool = False
) -> TrainResult:
    """Train a reward model on ``records`` and save it (weights, tokenizer, head) to ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = config or TrainConfig()
    records = [validate_record(r) for r in records]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)

    texts = [t for r in records for t in (r["prompt"], *r["responses"])]
    tokenizer = train_tokenizer(texts, config.vocab_size)
    tokenizer.save_pretrained(str(out_dir))
    vocab = len(tokenizer)
    formatter = ItemFormatter(tokenizer, ModelSpec(path=str(out_dir)), max_length=config.max_length, vocab_size=vocab)
    encoded = _encode_records(records, formatter)

    lm_config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.context_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    model = _Trainable(LlamaForCausalLM(lm_config), config.hidden_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps)
    result = TrainResult(out_dir=out_dir)
    steps = range(config.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="training reward model", unit="step")
    model.train()
    for _ in steps:
        batch = [encoded[rng.randrange(len(encoded))] for _ in range(config.batch_size)]
        seqs = [s for rec in batch for s in rec["seqs"]]
        ids, mask = _pad(seqs)
        rewards, lm_logits = model(ids, mask, want_lm=config.beta > 0)
        loss = _group_loss(rewards, [len(r["seqs"]) for r in batch], [r["margin"] for r in batch])
        if config.beta > 0:
            chosen_rows = torch.tensor(_first_rows(batch))
            resp_mask = mask[chosen_rows].clone()
            for row, rec in enumerate(batch):
                resp_mask[row, : rec["prompt_len"]] = 0
            loss = loss + config.beta * imitation_loss(lm_logits[chosen_rows], ids[chosen_rows], resp_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        result.losses.append(loss.item())
        if progress:
            steps.set_postfix(loss=f"{loss.item():.3f}")
    save_checkpoint(model, out_dir, config)
    return result


def _first_rows(batch: list[dict]) -> list[int]:
    rows, offset = [], 0
    for rec in batch:
        rows.append(offset)
        offset += len(rec["seqs"])
    return rows


def save_checkpoint(model: _Trainable, out_dir: Path, config: TrainConfig) -> None:
    """``LlamaForCausalLM`` weights + ``reward_head.weight`` in the same safetensors file."""
    from safetensors.torch import load_file, save_file

    from .quiet import quiet_transformers

    with quiet_transformers():
        model.lm.save_pretrained(str(out_dir))
    weights_path = out_dir / "model.safetensors"

    tensors = load_file(str(weights_path))
    tensors["reward_head.weight"] = model.reward_head.weight.detach().float().contiguous()
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    (out_dir / "rmserve_train.json").write_text(json.dumps(asdict(config), indent=2))
