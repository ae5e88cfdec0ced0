"""What the server benchmark sends: each workload as HTTP requests, for rmserve, the naive baseline and the peers.

Every server gets the same items. The baseline only has ``/v1/score``, so a GRPO group or a preference pair
goes to it as one ``/v1/score`` request holding the same items (what a user of a plain server would do).

The peer workloads (``QUERY_WORKLOADS``) are what an RL trainer sends a reward server: one formatted text sample
per request (``BOS prompt \n response EOS``, as OpenRLHF decodes its rollouts), PPO samples (≈ 200 tokens, nothing
shared), GRPO samples (8 share a 768-1,024-token prompt) and best-of-16 samples (16 share ≈ 1,024 tokens, ≈ 128-token
responses), groups interleaved. OpenRLHF's ``serve_rm.py`` and rmserve get them through OpenRLHF's protocol
(``POST /get_reward {"query": [text]}``, rmserve's drop-in route), the naive baseline as a ``/v1/score`` text item.

Example::

    requests = build_requests("grpo", "rmserve", vocab_size=704, n_requests=64)   # /v1/rerank, 8 per group
    fmt = QueryFormat.from_tokenizer(tokenizer)
    requests = build_requests("grpo-query", "openrlhf", vocab_size=768, n_requests=64, fmt=fmt)  # /get_reward
"""

from __future__ import annotations

from dataclasses import dataclass

from .loadgen import BenchRequest
from .workloads import (
    BEST_OF_16,
    GRPO_SHARED,
    PPO_CPU,
    PPO_FULL,
    PPOShape,
    grpo_groups,
    interleaved_samples,
    pairwise_pairs,
    ppo_text_items,
    ppo_token_items,
    shared_prompt_groups,
    short_token_items,
)

# Text lengths are in words; the demo's byte-level BPE makes ≈ 2.7 tokens of each, so this is ≈ 260 tokens.
TEXT_CPU = PPOShape(prompt_median=48, response_median=48, sigma=0.6, min_length=4, max_total=384)
BATCHED_ITEMS = 64  # items per request in the batched PPO workload
GRPO_RESPONSES = 8  # responses per prompt in a GRPO / best-of-n group
QUERY_WORKLOADS = ("ppo-query", "grpo-query", "best-of-16-query")  # the peer comparison: one text sample a request
WORKLOADS = ("short-single", "ppo-single", "ppo-batched", "grpo", "pairwise", "grpo-per-sample", "best-of-16",
             *QUERY_WORKLOADS)  # fmt: skip
PREFIX_WORKLOADS = ("grpo-per-sample", "best-of-16", "ppo-single")  # the prefix-sharing comparison
GET_REWARD_KINDS = ("rmserve", "openrlhf")  # servers that take the query workloads through POST /get_reward


@dataclass(frozen=True)
class QueryFormat:
    """How a sample becomes the text a trainer sends: ``bos + prompt + separator + response + eos`` (OpenRLHF decodes
    its rollouts with their special tokens). ``adds_bos``: the tokenizer puts BOS in front on its own, so a server
    that tokenizes with special tokens and does not collapse a doubled BOS (the naive baseline) gets the text
    without its leading BOS; OpenRLHF's server tokenizes without special tokens and rmserve collapses the double."""

    bos: str = ""
    eos: str = ""
    adds_bos: bool = False
    separator: str = "\n"

    @classmethod
    def from_tokenizer(cls, tokenizer) -> QueryFormat:
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        bos_id = tokenizer.bos_token_id
        adds_bos = bos_id is not None and len(probe) > 0 and probe[0] == bos_id
        return cls(bos=tokenizer.bos_token or "", eos=tokenizer.eos_token or "", adds_bos=adds_bos)

    def query(self, sample: dict) -> str:
        return f"{self.bos}{sample['prompt']}{self.separator}{sample['response']}{self.eos}"

    def without_added_bos(self, text: str) -> str:
        """``text`` for a server whose tokenizer adds BOS itself (and keeps a second one)."""
        return text[len(self.bos) :] if self.adds_bos and self.bos and text.startswith(self.bos) else text


def query_samples(workload: str, n_requests: int, seed: int = 0) -> list[dict]:
    """``n_requests`` samples ``{"prompt", "response"}`` of a query workload (GRPO / best-of-16: whole groups,
    interleaved, ``n_requests`` rounded down to whole groups, at least one)."""
    if workload == "ppo-query":
        return ppo_text_items(n_requests, seed=seed)
    shape = {"grpo-query": GRPO_SHARED, "best-of-16-query": BEST_OF_16}.get(workload)
    if shape is None:
        raise ValueError(f"unknown query workload {workload!r}; one of {QUERY_WORKLOADS}")
    return interleaved_samples(shared_prompt_groups(max(1, n_requests // shape.n), shape, seed=seed))


def query_request(text: str, server: str, fmt: QueryFormat) -> BenchRequest:
    """One formatted sample for ``server``: ``/get_reward`` (rmserve, OpenRLHF), else a ``/v1/score`` text item."""
    if server in GET_REWARD_KINDS:
        return BenchRequest("/get_reward", {"query": [text]}, 1)
    return BenchRequest("/v1/score", {"items": [{"text": fmt.without_added_bos(text)}]}, 1)


@dataclass(frozen=True)
class Scenario:
    """A workload on a model at some concurrency levels."""

    model: str
    workload: str
    concurrencies: tuple[int, ...]
    n_requests: int
    max_seconds: float
    ppo_shape: PPOShape = PPO_CPU


def build_requests(
    workload: str,
    server: str,
    *,
    vocab_size: int,
    n_requests: int,
    seed: int = 0,
    ppo_shape: PPOShape = PPO_CPU,
    fmt: QueryFormat | None = None,
) -> list[BenchRequest]:
    """``n_requests`` requests of ``workload`` in the form ``server`` (a server kind: "rmserve", "baseline",
    "openrlhf", "ceiling") accepts; ``fmt`` formats the query workloads' texts (the checkpoint's tokenizer)."""
    if workload in QUERY_WORKLOADS:
        fmt = fmt or QueryFormat()
        return [query_request(fmt.query(s), server, fmt) for s in query_samples(workload, n_requests, seed)]
    if server == "openrlhf":
        raise ValueError(f"OpenRLHF's serve_rm.py only takes the query workloads {QUERY_WORKLOADS}, not {workload!r}")
    native = server != "baseline"
    if workload == "short-single":
        items = short_token_items(n_requests, vocab_size, seed=seed)
        return [BenchRequest("/v1/score", {"items": [item]}, 1) for item in items]
    if workload == "ppo-single":
        items = ppo_token_items(n_requests, vocab_size, seed=seed, shape=ppo_shape)
        return [BenchRequest("/v1/score", {"items": [item]}, 1) for item in items]
    if workload == "ppo-batched":
        items = ppo_token_items(n_requests * BATCHED_ITEMS, vocab_size, seed=seed, shape=ppo_shape)
        chunks = [items[i : i + BATCHED_ITEMS] for i in range(0, len(items), BATCHED_ITEMS)]
        return [BenchRequest("/v1/score", {"items": chunk}, len(chunk)) for chunk in chunks]
    if workload == "grpo":
        groups = grpo_groups(n_requests, GRPO_RESPONSES, seed=seed, shape=TEXT_CPU)
        if native:
            return [BenchRequest("/v1/rerank", {"groups": [g]}, len(g["responses"])) for g in groups]
        return [
            BenchRequest("/v1/score", {"items": [{"prompt": g["prompt"], "response": r} for r in g["responses"]]},
                         len(g["responses"]))
            for g in groups
        ]  # fmt: skip
    if workload == "grpo-per-sample":  # what OpenRLHF and verl send: one sample per request, groups interleaved
        groups = shared_prompt_groups(max(1, n_requests // GRPO_SHARED.n), GRPO_SHARED, seed=seed)
        items = [{"prompt": g["prompt"], "response": g["responses"][k]} for k in range(GRPO_SHARED.n) for g in groups]
        return [BenchRequest("/v1/score", {"items": [item]}, 1) for item in items]
    if workload == "best-of-16":
        groups = shared_prompt_groups(n_requests, BEST_OF_16, seed=seed)
        if native:
            return [BenchRequest("/v1/rerank", {"groups": [g]}, BEST_OF_16.n) for g in groups]
        return [
            BenchRequest("/v1/score", {"items": [{"prompt": g["prompt"], "response": r} for r in g["responses"]]},
                         BEST_OF_16.n)
            for g in groups
        ]  # fmt: skip
    if workload == "pairwise":
        pairs = pairwise_pairs(n_requests, seed=seed, shape=TEXT_CPU)
        if native:
            return [BenchRequest("/v1/preference", {"pairs": [p]}, 2) for p in pairs]
        return [
            BenchRequest("/v1/score", {"items": [{"prompt": p["prompt"], "response": p["response_a"]},
                                                 {"prompt": p["prompt"], "response": p["response_b"]}]}, 2)
            for p in pairs
        ]  # fmt: skip
    raise ValueError(f"unknown workload {workload!r}; one of {WORKLOADS}")


def prefix_plan(quick: bool) -> list[Scenario]:
    """The prefix-sharing comparison on bench-20M: GRPO per-sample, best-of-16 and PPO (nothing shared)."""
    scale = 1 if quick else 2
    return [
        Scenario("bench-20M", "grpo-per-sample", (64,), 64 * scale, 120.0),
        Scenario("bench-20M", "best-of-16", (4,), 8 * scale, 120.0),
        Scenario("bench-20M", "ppo-single", (64,), 128 * scale, 60.0),
    ]


def peer_plan(quick: bool) -> list[Scenario]:
    """The comparison with OpenRLHF's ``serve_rm.py``: 64 clients, one sample per request. PPO on ``tiny-1L``
    (1 layer, width 64: the forward costs nothing, the serving path is measured) and on bench-20M; GRPO and
    best-of-16 samples on bench-20M."""
    scale = 1 if quick else 2
    return [
        Scenario("tiny-1L", "ppo-query", (64,), 1024 * scale, 10.0 * scale),
        Scenario("bench-20M", "ppo-query", (64,), 128 * scale, 30.0 * scale),
        Scenario("bench-20M", "grpo-query", (64,), 64 * scale, 60.0 * scale),
        Scenario("bench-20M", "best-of-16-query", (64,), 64 * scale, 60.0 * scale),
    ]


def scenario_plan(quick: bool, model: str | None = None) -> list[Scenario]:
    """The server scenarios of a run. ``quick`` keeps the two headline comparisons and small GRPO/pairwise runs.

    ``model`` (a checkpoint directory, e.g. an 8B-shape one on a GPU machine) replaces the CPU plan with the
    PPO mix at full size (512 + 512 median, ≤ 4,096 tokens), single-item and batched.
    """
    if model is not None:
        return [
            Scenario(model, "ppo-single", (1, 64) if quick else (1, 16, 64), 256 if quick else 1024, 120.0, PPO_FULL),
            Scenario(model, "ppo-batched", (4,), 4 if quick else 16, 120.0, PPO_FULL),
        ]
    if quick:
        return [
            Scenario("demo", "short-single", (1, 64), 1536, 6.0),
            Scenario("demo", "grpo", (16,), 48, 4.0),
            Scenario("demo", "pairwise", (16,), 96, 4.0),
            Scenario("bench-20M", "ppo-single", (64,), 128, 25.0),
        ]
    return [
        Scenario("demo", "short-single", (1, 4, 16, 64), 4096, 15.0),
        Scenario("demo", "ppo-batched", (1, 4), 16, 15.0),
        Scenario("demo", "grpo", (4, 16, 64), 256, 10.0),
        Scenario("demo", "pairwise", (4, 16, 64), 512, 10.0),
        Scenario("bench-20M", "ppo-single", (1, 64), 192, 45.0),
        Scenario("bench-20M", "ppo-batched", (2,), 4, 45.0),
    ]
