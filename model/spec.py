"""``ModelSpec``: everything needed to load and run one reward model, in one validated object."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

Dtype = Literal["auto", "fp32", "bf16", "fp16"]
Quantization = Literal["none", "int8", "nf4"]
HeadName = Literal["auto", "score", "reward_head", "v_head", "value_head"]
PAIR_PLACEHOLDERS = ("prompt", "response_a", "response_b")  # what verdict_pair_template is filled with


def _yaml_switch(value: Any) -> Any:
    """An unquoted ``on``/``off`` (or ``yes``/``no``) in a YAML file arrives as a boolean: take it as the word."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


OnOff = Annotated[Literal["on", "off"], BeforeValidator(_yaml_switch)]
AutoOnOff = Annotated[Literal["auto", "on", "off"], BeforeValidator(_yaml_switch)]


class ModelSpec(BaseModel):
    """How to load and run a reward model.

    Example::

        spec = ModelSpec(path="/ckpt/my-rm", dtype="bf16", max_length=4096)
        rm = load_reward_model(spec)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field("demo", description="Local checkpoint directory, or 'demo' for the built-in demo reward model.")
    dtype: Dtype = Field(
        "auto",
        description="Weights/activation dtype. 'auto': bf16 on CUDA; on CPU, bf16 only when the CPU has bf16 units "
        "(AVX512-BF16/AMX), else fp32.",
    )
    quantization: Quantization = Field(
        "none", description="bitsandbytes weight quantisation of the backbone (the reward head is never quantised)."
    )
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    max_length: int | None = Field(
        None, ge=8, le=1_048_576, description="Longest input in tokens; default: the model's context, at most 8192."
    )
    truncation: Literal["left", "error"] = Field(
        "left",
        description="Over-long items: 'left' drops the oldest prompt tokens (keeps BOS and the whole response end) "
        "and flags the item; 'error' rejects it with context_length_exceeded.",
    )
    template: Literal["auto", "chat", "raw"] = Field(
        "auto",
        description="'chat' renders items with the tokenizer's chat template; 'raw' joins prompt and response with "
        "`separator`; 'auto' uses the template when the tokenizer has one.",
    )
    separator: str = Field("\n", max_length=64, description="Joins prompt and response in 'raw' formatting.")
    eos: Literal["auto", "always", "never"] = Field(
        "auto",
        description="EOS after the response (pair and conversation items): 'auto' keeps what the template renders "
        "(raw: none), 'always' ensures one, 'never' removes a trailing one.",
    )
    head: HeadName = Field("auto", description="Which reward head to use; 'auto' detects it from the weights.")
    head_file: str | None = Field(
        None, description="Safetensors file holding the reward head, when it is not in the model's own weights."
    )
    reward_mean: float | None = Field(None, description="Normalisation mean; overrides config.json.")
    reward_std: float | None = Field(None, gt=0, description="Normalisation std; overrides config.json.")
    max_batch_tokens: int = Field(
        16384, ge=1, le=10_000_000, description="Padded-token budget (rows x longest row) of one forward micro-batch."
    )
    padding_side: Literal["right", "left"] = Field(
        "right", description="Where micro-batches are padded; rewards do not depend on it."
    )
    prefix_sharing: OnOff = Field(
        "on",
        description="Compute token-id prefixes shared by several items (a GRPO group's prompt, a system prompt) "
        "once and score the rest against their cached keys/values. Rewards are unchanged; 'off' runs every item "
        "whole.",
    )
    prefix_cache_bytes: int | None = Field(
        None,
        ge=0,
        le=1 << 44,
        description="Bytes of prefix keys/values kept across batches (least recently used out), so group members "
        "arriving in later batches reuse their prompt. Default: 10% of the device's memory (the GPU's on CUDA; on CPU "
        "the host's or its container's limit, at least 1 GiB); 0 shares prefixes within a batch only.",
    )
    reward_cache_items: int = Field(
        65536,
        ge=0,
        le=100_000_000,
        description="Rewards of recently scored token sequences kept to answer exact duplicates without a forward; "
        "0 turns it off.",
    )
    forward_overhead_tokens: float | None = Field(
        None,
        ge=0,
        le=10_000_000,
        description="Fixed cost of one forward pass, in tokens' worth of compute: the planner trades padding and "
        "extra forwards against it, and a shared prefix must save at least this much. Default: measured on the "
        "machine when the model loads.",
    )
    batch_invariant: bool = Field(
        False,
        description="An item's reward is the same bits whatever its batch: batch size, neighbours, padding, "
        "micro-batch split, prefix- and reward-cache hits (fixed-shape matmuls and attention over fixed key blocks; "
        "costs some throughput, see the README). Not with quantization.",
    )
    compile: AutoOnOff = Field(
        "auto",
        description="Run each RMSNorm and MLP module through torch.compile, fusing their elementwise work (needs a "
        "C++ compiler on a CPU; compiling takes seconds at load; falls back to eager if it fails). 'auto': on a CPU, "
        "not batch-invariant, unquantized, hidden size at least 512.",
    )
    reward_kind: Literal["auto", "outcome", "process"] = Field(
        "auto",
        description="'process': a reward per step (POST /v1/steps only); 'outcome': one reward per item; 'auto' "
        "reads it from the checkpoint (*ForProcessRewardModel, *ForTokenClassification with 2 labels, "
        "step_label_tokens or step_separator set: process). A one-output head served as 'process' is a value-head "
        "PRM (sigmoid at each separator).",
    )
    step_separator: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="A process reward model's step separator: the text of one token, placed as its token id after "
        "each step. Default by format: '<extra_0>' (*ForProcessRewardModel), '\\n' (*ForTokenClassification with 2 "
        "labels, value-head PRMs), 'ки' (causal-LM PRMs).",
    )
    step_label_tokens: str | None = Field(
        None,
        pattern=r"^[^,]+,[^,]+$",
        description="A causal-LM process reward model's good and bad label tokens, 'good,bad' (Math-Shepherd: '+,-'): "
        "the step reward is P(good) over the two at each separator. Setting it serves the checkpoint as a PRM.",
    )
    verdict_tokens: str | None = Field(
        None,
        pattern=r"^[^,]+(,[^,]+)+$",
        description="Serve a causal-LM judge by its verdict tokens, 'Yes,No' (or 'A,B', ...): the reward is the "
        "probability of the first at the end of the input (send the judge's whole input, templated, as a text item), "
        "read from one forward without decoding.",
    )
    verdict_softmax: bool = Field(
        True,
        description="true: softmax over just the verdict tokens' logits; false: the first token's probability under "
        "the whole vocabulary.",
    )
    verdict_pair_template: str | None = Field(
        None,
        min_length=1,
        max_length=16384,
        description="Makes a verdict judge pairwise (verdict_tokens 'A,B': the first names response a): POST "
        "/v1/preference fills this text's {prompt}, {response_a} and {response_b} with each pair and gives P(a > b) "
        "as the first verdict token's probability at its end, from one forward (instead of sigmoid(r_a - r_b)). The "
        "filled text is scored as already formatted: write the judge's chat markup into it.",
    )
    attribute_weights: dict[str, float] | None = Field(
        None,
        description="A multi-attribute model (*ForSequenceClassification with several labels): the weight of each "
        "attribute, by its id2label name, in the one reward ensembles, normalisation and telemetry use (attributes "
        "left out weigh 0). Default: their mean. Every attribute is returned by name as well.",
    )
    trust_remote_code: bool = Field(False, description="Allow checkpoint code to run (off unless you trust it).")

    @model_validator(mode="after")
    def _pair_template_needs_a_judge(self) -> ModelSpec:
        if self.verdict_pair_template is None:
            return self
        if self.verdict_tokens is None:
            raise ValueError("verdict_pair_template makes a verdict judge pairwise: set verdict_tokens too ('A,B')")
        missing = [p for p in PAIR_PLACEHOLDERS if "{" + p + "}" not in self.verdict_pair_template]
        if missing:
            raise ValueError(f"verdict_pair_template lacks the placeholders {['{' + p + '}' for p in missing]}")
        return self

    @model_validator(mode="after")
    def _invariant_needs_plain_weights(self) -> ModelSpec:
        if self.batch_invariant and self.quantization != "none":
            raise ValueError("batch_invariant needs quantization 'none' (bitsandbytes kernels are not batch-invariant)")
        return self
