"""Train a small byte-level BPE tokenizer locally (no downloads) with a chat template.

The template writes ``{{ bos_token }}`` itself while the tokenizer also adds BOS on encode — the
common real-world combination that duplicates BOS unless the formatter collapses it.
"""

from __future__ import annotations

from collections.abc import Iterable

ROLE_TOKENS = ["<|system|>", "<|developer|>", "<|user|>", "<|assistant|>", "<|tool|>"]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", *ROLE_TOKENS]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, *, chat_template: bool = True, pad_token=None):
    """A ``PreTrainedTokenizerFast`` trained on ``texts`` (BOS added on encode; no pad token by default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + ([pad_token] if pad_token else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token=pad_token,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE if chat_template else None,
    )
    return fast
