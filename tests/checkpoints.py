"""Build tiny real reward-model checkpoints for tests (real ``save_pretrained``, locally trained tokenizers).

Every head format is written from the *same* weights, so the rewards of all formats must agree with
one reference forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rmserve.model.synthetic import corpus, make_preference_pairs
from rmserve.model.tokenizer_builder import train_tokenizer

HEAD_FORMATS = ("score", "reward_head", "v_head_file", "value_head")
ARCHS = ("llama", "mistral", "qwen2")
# Sliding-window attention, a window shorter than the test items: every layer (Mistral), full and sliding layers
# mixed (Qwen2, Gemma 2: eager attention with logit soft-capping).
WINDOWED_ARCHS = ("mistral-window", "qwen2-window", "gemma2", "gemma3")
MORE_ARCHS = ("qwen3", "phi3", "olmo2")  # other decoder families, full attention


def build_tokenizer(variant: str = "chat"):
    """variant: 'chat' (template, no pad), 'raw' (no template), 'pad_eos' (template, pad_token == eos_token),
    'pad' (template, a '<pad>' token of its own)."""
    texts = corpus(make_preference_pairs(400, seed=7))
    pad = "<pad>" if variant == "pad" else None
    tok = train_tokenizer(texts, vocab_size=400, chat_template=variant != "raw", pad_token=pad)
    if variant == "pad_eos":
        tok.pad_token = tok.eos_token
    return tok


def _config(arch: str, vocab: int, tok):
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GptOssConfig,
        LlamaConfig,
        MistralConfig,
        Olmo2Config,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        num_labels=1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    more = {
        "mistral-window": lambda: MistralConfig(**common, sliding_window=8),
        "qwen2-window": lambda: Qwen2Config(**common, use_sliding_window=True, sliding_window=8, max_window_layers=1),
        "gemma2": lambda: Gemma2Config(
            **common, head_dim=8, query_pre_attn_scalar=8, sliding_window=8, attn_logit_softcapping=0.5
        ),  # a cap small enough to bite
        "gemma3": lambda: Gemma3TextConfig(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=8),
        "gpt_oss": lambda: GptOssConfig(
            **common, head_dim=8, sliding_window=8, num_local_experts=4, num_experts_per_tok=2
        ),  # attention sinks
        "qwen3": lambda: Qwen3Config(**common, head_dim=8),
        "phi3": lambda: Phi3Config(**common),
        "olmo2": lambda: Olmo2Config(**common),
        "llama-mqa": lambda: LlamaConfig(**{**common, "num_key_value_heads": 1, "head_dim": 64}),  # MQA, wide heads
    }
    if arch in more:
        return more[arch]()
    return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch](**common)


def reference_model(arch: str, tok, seed: int = 0):
    """The ``*ForSequenceClassification`` model every format is derived from (head = ``score``)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(_config(arch, len(tok), tok))
    with torch.no_grad():  # a visible reward scale, and a bias-free head like real RMs
        model.score.weight.normal_(0, 1.0)
    return model.eval()


def reference_reward(model, ids) -> float:
    """transformers' own forward of the unpadded single sequence: the head on its last token."""
    saved = model.config.pad_token_id
    model.config.pad_token_id = None  # a batch of one without padding: the last token is the last real token
    try:
        with torch.no_grad():
            return float(model(torch.tensor([list(ids)])).logits[0, 0])
    finally:
        model.config.pad_token_id = saved


def save_checkpoint(
    out: Path, head_format: str, arch: str = "llama", tok_variant: str = "chat", seed: int = 0, **config_extra
):
    """Write a checkpoint of ``head_format`` (weights from ``seed``); return ``(dir, reference_model, tokenizer)``."""
    from transformers import AutoModelForCausalLM

    out = Path(out)
    tok = build_tokenizer(tok_variant)
    ref = reference_model(arch, tok, seed)
    for k, v in config_extra.items():
        setattr(ref.config, k, v)
    tok.save_pretrained(str(out))
    if head_format == "score":
        ref.save_pretrained(str(out))
        return out, ref, tok

    causal = AutoModelForCausalLM.from_config(ref.config)
    causal.model.load_state_dict(ref.model.state_dict())
    for k, v in config_extra.items():
        setattr(causal.config, k, v)
    causal.save_pretrained(str(out))
    head = ref.score.weight.detach().clone()
    if head_format == "v_head_file":
        save_file({"v_head.weight": head}, str(out / "v_head.safetensors"))
    else:
        weights = load_file(str(out / "model.safetensors"))
        weights[f"{head_format}.weight"] = head
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out, ref, tok


@contextlib.contextmanager
def sharing_off(engine) -> Iterator:
    """``engine`` with prefix sharing and both caches off inside the block (then restored as they were)."""
    saved = (engine.prefix_sharing, engine.prefix_cache.max_bytes, engine.reward_cache.max_items)
    engine.configure_sharing(prefix_sharing=False, prefix_cache_bytes=0, reward_cache_items=0)
    try:
        yield engine
    finally:
        engine.configure_sharing(prefix_sharing=saved[0], prefix_cache_bytes=saved[1], reward_cache_items=saved[2])


def unshared_rewards(engine, seqs) -> list:
    """What ``engine`` gives ``seqs`` scored whole: no prefix sharing, no caches."""
    with sharing_off(engine):
        return engine.score_batch(seqs)


def save_judge_checkpoint(out: Path, seed: int = 5):
    """A tiny causal-LM judge (LLaMA, the chat tokenizer, a visible ``lm_head`` scale); return ``(dir, model,
    tokenizer)``: ``model`` is transformers' own ``AutoModelForCausalLM``, the reference."""
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer("chat")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config("llama", len(tok), tok)).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.15)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return Path(out), model, tok


def last_logits(model, ids) -> torch.Tensor:
    """transformers' next-token logits after the unpadded sequence ``ids`` (fp32)."""
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0, -1].float()
