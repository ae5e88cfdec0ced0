"""The naive reward server a team writes in an afternoon: what rmserve is measured against.

FastAPI + uvicorn + ``transformers``, the pattern of OpenRLHF's ``serve_rm.py``: an ``async`` route that runs
the model on the event loop, so each request is scored on its own as it arrives (its items padded to the
longest in chunks of ``--batch-size``) and there is no batching across requests. Same request and response
body as rmserve's ``POST /v1/score`` (``{"items": [...]}`` → ``{"rewards": [...]}``), so one load generator
drives both. Checkpoints with a ``score`` head load as ``AutoModelForSequenceClassification``; a causal LM with
a separate head (``reward_head`` / ``v_head`` / ``value_head``, like the demo model) as ``AutoModel`` plus a
``Linear(hidden, 1)`` read from the safetensors file.

    python -m rmserve.benchmarks.baseline_server --model ~/.cache/rmserve/demo-v1 --port 8100 --dtype fp32
    python -m rmserve.benchmarks.baseline_server --model unused --no-model --port 8101   # HTTP ceiling: no model
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from fastapi import FastAPI, Request

HEAD_NAMES = ("reward_head", "v_head", "value_head")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def find_head_weight(model_dir: Path) -> tuple[str, torch.Tensor] | None:
    """``(name, weight)`` of a separate reward head in the checkpoint's safetensors files, else None."""
    from safetensors import safe_open

    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                parts = key.split(".")
                if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in HEAD_NAMES:
                    return parts[-2], handle.get_tensor(key)
    return None


class NaiveRewardModel:
    """Tokenize a request's items, pad them to the longest, forward, take each row's last real token."""

    def __init__(self, model_dir: str, dtype: str = "fp32", device: str = "cpu", batch_size: int = 16):
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        self.dir, self.device, self.batch_size = Path(model_dir), torch.device(device), batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.unk_token or self.tokenizer.eos_token
        head = find_head_weight(self.dir)
        if head is None:  # a sequence-classification checkpoint: transformers finds the last non-pad token
            self.model = AutoModelForSequenceClassification.from_pretrained(
                model_dir, dtype=DTYPES[dtype], num_labels=1
            )
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
            self.head = None
        else:
            self.model = AutoModel.from_pretrained(model_dir, dtype=DTYPES[dtype])
            self.head = torch.nn.Linear(head[1].shape[-1], 1, bias=False)
            self.head.weight.data.copy_(head[1].reshape(1, -1).float())
            self.head.to(self.device)
        self.model.to(self.device).eval()
        self.max_length = min(getattr(self.model.config, "max_position_embeddings", 4096), 8192)
        self.model_id = self.dir.name

    def encode(self, item: dict) -> list[int]:
        if "input_ids" in item:
            ids = list(item["input_ids"])
        elif "text" in item:
            ids = self.tokenizer(item["text"])["input_ids"]
        else:
            messages = [{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": item["response"]}]
            if self.tokenizer.chat_template:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = self.tokenizer(item["prompt"] + "\n" + item["response"])["input_ids"]
        return ids[-self.max_length :]

    @torch.inference_mode()
    def score(self, items: list[dict]) -> list[float]:
        rewards: list[float] = []
        encoded = [self.encode(item) for item in items]
        for start in range(0, len(encoded), self.batch_size):
            batch = self.tokenizer.pad({"input_ids": encoded[start : start + self.batch_size]}, return_tensors="pt")
            input_ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            if self.head is None:
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits[:, 0]
            else:
                hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
                last = hidden[torch.arange(len(hidden), device=self.device), mask.sum(dim=1) - 1]
                logits = self.head(last.float())[:, 0]
            rewards.extend(logits.float().tolist())
        return rewards


def create_app(model: NaiveRewardModel | NullModel) -> FastAPI:
    app = FastAPI(title="naive reward server (benchmark baseline)")

    @app.post("/v1/score")
    async def score(request: Request) -> dict:
        body = await request.json()
        return {"model": model.model_id, "rewards": model.score(body["items"])}  # blocks the loop: one at a time

    @app.get("/ready")
    async def ready() -> dict:
        return {"status": "ready", "model": model.model_id}

    return app


class NullModel:
    """Scores nothing (every reward 0.0): with ``--no-model`` the server measures the HTTP ceiling of the machine."""

    model_id = "null"

    def score(self, items: list[dict]) -> list[float]:
        return [0.0] * len(items)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per forward within one request")
    parser.add_argument("--no-model", action="store_true", help="answer 0.0 without a model (HTTP ceiling)")
    args = parser.parse_args(argv)

    import uvicorn

    model = NullModel() if args.no_model else NaiveRewardModel(args.model, args.dtype, args.device, args.batch_size)
    model.score([{"text": "warm-up"}])
    uvicorn.run(create_app(model), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
