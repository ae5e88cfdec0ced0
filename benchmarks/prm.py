"""Process reward model traffic through the whole server: GRPO groups scored per step, one sample per request.

A GRPO group is n = 8 solutions of one prompt (≈ 768 tokens), each of 6 steps of ≈ 40 tokens; every sample is its own
``POST /v1/steps`` request, all sent at once, groups interleaved (as a trainer's reward workers send them). The
server is ``rmserve serve --runtime inprocess`` with a bench-20M-shaped PRM (LLaMA 512 × 6 layers, random weights,
``LlamaForTokenClassification`` with two labels: TRL's ``PRMTrainer`` format, separator ``\\n``), once with prefix
sharing on (the default) and once with ``--prefix-sharing off`` (every sample computed whole, as vLLM's STEP pooling
does), reward cache off in both. Reported per mode: items/s, tokens received (``usage.input_tokens``), tokens
computed (the server's ``rmserve_forward_real_tokens``), their ratio, and the largest step-reward difference between
the modes.

    python -m rmserve.benchmarks.prm --groups 4 --repeats 3   # 2-core CPU: 32 requests per run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path

import httpx
import torch

from .launch import free_port, rmserve_command, running_server
from .models import model_config

N_SAMPLES, PROMPT_TOKENS, STEPS, STEP_TOKENS = 8, 768, 6, 40
WORDS = (
    "clips friends april may half total sold twice each number step check answer add sum multiply divide first then "
    "so because since therefore we know that she he they bought gave left more less than equal value price apples"
).split()
CHECKPOINT_VERSION = "v1"


def ensure_prm_checkpoint(cache_dir: Path) -> Path:
    """bench-20M as a two-label token classifier (random weights) with the demo tokenizer, written once."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from rmserve.model.demo import ensure_demo_model
    from rmserve.model.quiet import quiet_transformers

    target = cache_dir / f"bench-20m-prm-{CHECKPOINT_VERSION}"
    if (target / "config.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_demo_model()))
    tokenizer.pad_token = tokenizer.unk_token
    config = model_config(
        "bench-20M", num_labels=2, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(config).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 0.05)
    with quiet_transformers():
        model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    return target


def text_of(tokenizer, rng: random.Random, tokens: int) -> str:
    """Random words until the text is about ``tokens`` tokens long."""
    words: list[str] = []
    while (short := tokens - len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"])) > 0:
        words += [rng.choice(WORDS) for _ in range(max(1, short // 5))]  # a word is 2-5 tokens here: approach
    return " ".join(words)


def grpo_step_requests(tokenizer, groups: int, seed: int = 0) -> list[dict]:
    """One ``/v1/steps`` body per sample: ``groups`` groups of 8, interleaved."""
    rng = random.Random(seed)
    members = []
    for _ in range(groups):
        prompt = text_of(tokenizer, rng, PROMPT_TOKENS)
        members.append([[text_of(tokenizer, rng, STEP_TOKENS) for _ in range(STEPS)] for _ in range(N_SAMPLES)])
        members[-1] = [{"prompt": prompt, "steps": steps} for steps in members[-1]]
    return [{"items": [group[k]]} for k in range(N_SAMPLES) for group in members]


def real_tokens(metrics_text: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics_text.splitlines()
        if line.startswith("rmserve_forward_real_tokens") and not line.startswith("#")
    )


async def send_all(url: str, bodies: list[dict]) -> tuple[float, list[dict], float]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=600.0, limits=limits) as client:
        await client.post("/v1/steps", json={"items": [{"prompt": "warm up", "steps": ["one", "two"]}]})
        before = real_tokens((await client.get("/metrics")).text)
        started = time.perf_counter()
        responses = await asyncio.gather(*(client.post("/v1/steps", json=body) for body in bodies))
        seconds = time.perf_counter() - started
        after = real_tokens((await client.get("/metrics")).text)
    for response in responses:
        response.raise_for_status()
    return seconds, [r.json() for r in responses], after - before


def run_mode(model_dir: Path, bodies: list[dict], sharing: str, log_dir: Path) -> dict:
    port = free_port()
    extra = ["--runtime", "inprocess", "--prefix-sharing", sharing, "--reward-cache-items", "0"]
    command = rmserve_command(str(model_dir), port, "fp32", extra)
    with running_server(command, port, log_path=log_dir / f"prm-{sharing}.log") as server:
        seconds, answers, computed = asyncio.run(send_all(server.url, bodies))
    received = sum(a["usage"]["input_tokens"] for a in answers)
    return {
        "sharing": sharing,
        "items": len(bodies),
        "seconds": round(seconds, 2),
        "items_per_s": round(len(bodies) / seconds, 2),
        "tokens_received": received,
        "tokens_computed": int(computed),
        "computed_over_received": round(computed / received, 3),
        "step_rewards": [a["results"][0]["step_rewards"] for a in answers],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=4, help="GRPO groups of 8 samples (one request per sample)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each mode, alternating; the fastest counts")
    parser.add_argument("--out", type=Path, default=Path(".cache/bench-prm"), help="logs and results.json")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from rmserve.model.demo import cache_root

    model_dir = ensure_prm_checkpoint(cache_root())
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    bodies = grpo_step_requests(tokenizer, args.groups)
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for repeat in range(args.repeats):  # alternating order; the fastest run of each mode counts (noise only slows)
        for mode in ("on", "off") if repeat % 2 == 0 else ("off", "on"):
            runs[mode].append(run_mode(model_dir, bodies, mode, args.out))
    on, off = (min(runs[mode], key=lambda r: r["seconds"]) for mode in ("on", "off"))
    ratios = [round(a["items_per_s"] / b["items_per_s"], 2) for a, b in zip(runs["on"], runs["off"], strict=True)]
    diff = max(
        abs(a - b)
        for ra, rb in zip(on.pop("step_rewards"), off.pop("step_rewards"), strict=True)
        for a, b in zip(ra, rb, strict=True)
    )
    sample = bodies[0]["items"][0]
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    summary = {
        "prompt_tokens": count(sample["prompt"]),
        "step_tokens": [count(step) for step in sample["steps"]],
        "on": on,
        "off": off,
        "speedup": round(on["items_per_s"] / off["items_per_s"], 2),
        "all_items_per_s": {mode: [r["items_per_s"] for r in runs[mode]] for mode in runs},
        "speedup_per_repeat": ratios,
        "median_speedup": round(statistics.median(ratios), 2),
        "max_step_reward_diff": diff,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
