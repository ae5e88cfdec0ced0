"""Seeded synthetic workloads shaped like RLHF traffic (no downloads).

* PPO rollout: prompt and response lengths lognormal (512 + 512 median, ≤ 4,096 total; ``PPO_CPU`` scales it
  down for 2-core runs), as token-id items ``{"input_ids"}`` or text items ``{"prompt", "response"}``.
* GRPO / best-of-n: P prompts × n responses sharing their prompt (``/v1/rerank`` groups).
* Shared-prompt groups for prefix sharing (``shared_prompt_groups``): GRPO per-sample (n = 8, P ≈ 768–1,024,
  R ≈ 192–256 tokens) and best-of-16 (P ≈ 1,024, R ≈ 128), lengths drawn in words (≈ 2.8 tokens each here).
* PPO text samples (``ppo_text_items``, ``PPO_TEXT``: 100 + 100 tokens median, lognormal, nothing shared) and the
  samples of shared-prompt groups one by one, groups interleaved (``interleaved_samples``): what RL trainers send
  a reward server, one sample per request.
* Pairwise evaluation: ``{"prompt", "response_a", "response_b"}`` (``/v1/preference`` pairs).
* Short items (≤ 64 tokens): where per-request overhead, not compute, dominates.

Example::

    lengths = ppo_lengths(1000, seed=0)          # lognormal, median ≈ 300, within [16, 2048]
    items = ppo_token_items(256, vocab_size=32000, seed=0, shape=PPO_CPU)
    groups = grpo_groups(8, 4, seed=0)           # 8 prompts × 4 responses
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


def lognormal_lengths(n: int, *, median: float, sigma: float, low: int, high: int, seed: int) -> list[int]:
    """``n`` integer lengths, lognormal around ``median``, clipped to ``[low, high]``."""
    rng = random.Random(seed)
    return [min(high, max(low, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def ppo_lengths(n: int, seed: int = 0, *, median: int = 300, low: int = 16, high: int = 2048) -> list[int]:
    """Total (prompt + response) lengths of a PPO rollout: lognormal, median ≈ 300, 16 to 2048 tokens."""
    return lognormal_lengths(n, median=median, sigma=0.8, low=low, high=high, seed=seed)


def random_token_ids(lengths: list[int], vocab_size: int, seed: int = 0, bos_id: int | None = None) -> list[list[int]]:
    """Random token sequences of the given lengths (ids in ``[2, vocab_size)``, optional leading BOS)."""
    rng = random.Random(seed)
    seqs = []
    for n in lengths:
        seq = [rng.randrange(2, vocab_size) for _ in range(n)]
        if bos_id is not None:
            seq[0] = bos_id
        seqs.append(seq)
    return seqs


# -- RLHF-shaped items ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PPOShape:
    """Prompt and response lengths of a PPO rollout, in tokens (lognormal each, total clipped)."""

    prompt_median: int = 512
    response_median: int = 512
    sigma: float = 0.6
    min_length: int = 8
    max_total: int = 4096


PPO_FULL = PPOShape()  # the mix: 512 + 512 median, up to 4,096 total (GPU runs)
PPO_CPU = PPOShape(prompt_median=128, response_median=128, max_total=1024)  # the same shape, scaled for 2 CPU cores
SHORT_MAX_TOKENS = 64

# A fixed word list for text items: no downloads, reproducible, tokenizes into several tokens per word or one.
WORDS = (
    "the of and to in is that it for on with as was at by be this are from or have an they which one you were "
    "her all she there would their we him been has when who will more no if out so said what up its about into "
    "than them can only other new some could time these two may then do first any my now such like our over man "
    "me even most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three reward model policy value token prompt response answer question"
).split()


def ppo_prompt_response_lengths(n: int, shape: PPOShape = PPO_FULL, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` (prompt, response) lengths: lognormal around their medians, each ≥ ``min_length``, sum ≤ ``max_total``."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = max(shape.min_length, round(rng.lognormvariate(math.log(shape.prompt_median), shape.sigma)))
        response = max(shape.min_length, round(rng.lognormvariate(math.log(shape.response_median), shape.sigma)))
        prompt = min(prompt, shape.max_total - shape.min_length)
        pairs.append((prompt, min(response, shape.max_total - prompt)))
    return pairs


def ppo_token_items(
    n: int, vocab_size: int, seed: int = 0, shape: PPOShape = PPO_FULL, bos_id: int | None = None
) -> list[dict]:
    """PPO rollout items as ``{"input_ids": [...]}`` (prompt + response token ids, random, seeded)."""
    lengths = [p + r for p, r in ppo_prompt_response_lengths(n, shape, seed)]
    return [{"input_ids": ids} for ids in random_token_ids(lengths, vocab_size, seed=seed + 1, bos_id=bos_id)]


def short_token_items(
    n: int, vocab_size: int, seed: int = 0, low: int = 16, high: int = SHORT_MAX_TOKENS
) -> list[dict]:
    """Short items (``low`` to ``high`` tokens, uniform): the per-request-overhead-bound case."""
    rng = random.Random(seed + 3)
    lengths = [rng.randint(low, high) for _ in range(n)]
    return [{"input_ids": ids} for ids in random_token_ids(lengths, vocab_size, seed=seed + 4)]


def grpo_groups(n_prompts: int, n_responses: int, seed: int = 0, shape: PPOShape = PPO_FULL) -> list[dict]:
    """GRPO / best-of-n: ``n_prompts`` groups ``{"prompt", "responses": [n_responses texts]}`` sharing their prompt."""
    rng = random.Random(seed + 5)
    groups = []
    for prompt_len, _ in ppo_prompt_response_lengths(n_prompts, shape, seed):
        response_lengths = [r for _, r in ppo_prompt_response_lengths(n_responses, shape, rng.randrange(1 << 30))]
        budget = shape.max_total - prompt_len
        responses = [random_text(max(1, min(r, budget)), rng) for r in response_lengths]
        groups.append({"prompt": random_text(prompt_len, rng), "responses": responses})
    return groups


WORDS_PER_TOKEN = 1 / 2.77  # the demo tokenizer on ``random_text`` (measured: 2,771 tokens per 1,000 words)


@dataclass(frozen=True)
class GroupShape:
    """Groups of ``n`` responses sharing one prompt; lengths in tokens, drawn uniformly from the ranges."""

    n: int
    prompt_tokens: tuple[int, int]
    response_tokens: tuple[int, int]


GRPO_SHARED = GroupShape(8, (768, 1024), (192, 256))
BEST_OF_16 = GroupShape(16, (960, 1088), (96, 160))


def shared_prompt_groups(n_groups: int, shape: GroupShape, seed: int = 0) -> list[dict]:
    """``n_groups`` text groups ``{"prompt", "responses"}`` of ``shape`` (token lengths converted to words)."""
    rng = random.Random(seed + 7)

    def words(bounds: tuple[int, int]) -> int:
        return max(1, round(rng.randint(*bounds) * WORDS_PER_TOKEN))

    return [
        {"prompt": random_text(words(shape.prompt_tokens), rng),
         "responses": [random_text(words(shape.response_tokens), rng) for _ in range(shape.n)]}
        for _ in range(n_groups)
    ]  # fmt: skip


PPO_TEXT = PPOShape(prompt_median=100, response_median=100, sigma=0.6, min_length=8, max_total=1024)  # ≈ 200 tokens


def ppo_text_items(n: int, seed: int = 0, shape: PPOShape = PPO_TEXT) -> list[dict]:
    """``n`` PPO samples ``{"prompt", "response"}`` as text, lengths in tokens from ``shape`` (converted to words at
    ``WORDS_PER_TOKEN``), each its own random words: nothing shared between samples."""
    rng = random.Random(seed + 8)
    return [
        {"prompt": random_text(max(1, round(p * WORDS_PER_TOKEN)), rng),
         "response": random_text(max(1, round(r * WORDS_PER_TOKEN)), rng)}
        for p, r in ppo_prompt_response_lengths(n, shape, seed)
    ]  # fmt: skip


def interleaved_samples(groups: list[dict]) -> list[dict]:
    """The groups' samples ``{"prompt", "response"}`` one by one, groups interleaved (every group's first response,
    then every group's second, ...): how a trainer's workers send a batch of GRPO / best-of-n rollouts."""
    n = max((len(g["responses"]) for g in groups), default=0)
    return [{"prompt": g["prompt"], "response": g["responses"][k]} for k in range(n) for g in groups
            if k < len(g["responses"])]  # fmt: skip


def pairwise_pairs(n: int, seed: int = 0, shape: PPOShape = PPO_FULL) -> list[dict]:
    """Pairwise evaluation: ``{"prompt", "response_a", "response_b"}`` (each total within ``max_total``)."""
    return [
        {"prompt": g["prompt"], "response_a": g["responses"][0], "response_b": g["responses"][1]}
        for g in grpo_groups(n, 2, seed=seed + 6, shape=shape)
    ]


def random_text(n_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))
