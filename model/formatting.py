"""Turn an item into the token ids the reward model scores: template, BOS/EOS policy, truncation.

The rules that keep rewards right:

* a chat template is rendered exactly once, and a BOS token is never duplicated (templates that
  write ``<s>`` themselves plus a tokenizer that adds one are a classic silent reward shift);
* over-long items are truncated from the **left** (oldest prompt tokens first), keeping a leading
  BOS and the whole end of the response, and flagged; policy ``error`` rejects them instead.

Example::

    fmt = ItemFormatter(tokenizer, spec, max_length=2048, vocab_size=32000)
    tok = fmt.encode({"prompt": "Hi", "response": "Hello!"}, index=0)
    tok.input_ids, tok.truncated
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ContextLengthExceededError, InvalidRequestError, item_error
from .items import ConversationItem, Item, Message, PairItem, TextItem, TokensItem, parse_item
from .spec import ModelSpec


@dataclass(frozen=True, slots=True)
class TokenizedItem:
    """One item ready for the engine."""

    input_ids: tuple[int, ...]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


def left_truncate(ids: list[int], max_length: int, bos_id: int | None) -> list[int]:
    """Keep the last ``max_length`` tokens, and the leading BOS when the sequence has one."""
    if len(ids) <= max_length:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id:
        return [bos_id, *ids[len(ids) - (max_length - 1) :]]
    return ids[len(ids) - max_length :]


class ItemFormatter:
    """Formats and tokenizes items for one tokenizer and one ``ModelSpec``."""

    def __init__(self, tokenizer: Any, spec: ModelSpec, *, max_length: int, vocab_size: int):
        self.tokenizer = tokenizer
        self.spec = spec
        self.max_length = max_length
        self.vocab_size = vocab_size
        self.bos_id: int | None = tokenizer.bos_token_id
        self.eos_id: int | None = tokenizer.eos_token_id
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if spec.template == "chat" and not has_template:
            raise InvalidRequestError("template='chat' but the tokenizer has no chat template; use 'raw' or 'auto'")
        self.use_template = spec.template == "chat" or (spec.template == "auto" and has_template)
        # Does this tokenizer put BOS in front on its own? (LLaMA-style: yes; Qwen: no.)
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.adds_bos = self.bos_id is not None and len(probe) > 0 and probe[0] == self.bos_id

    @property
    def template_name(self) -> str:
        return "chat" if self.use_template else "raw"

    # -- public -----------------------------------------------------------------------------
    def encode(self, item: Item | dict, index: int = 0) -> TokenizedItem:
        """Validate, render, tokenize and truncate one item; errors name ``index``."""
        item = parse_item(item, index)
        if isinstance(item, TokensItem):
            ids = self._check_token_ids(item.input_ids, index)
        elif isinstance(item, TextItem):
            if not item.text:
                raise item_error(InvalidRequestError, index, "text is empty", field="text")
            ids = self._tokenize_text(item.text)
        else:
            messages = self._messages(item, index)
            ids = self._apply_eos(self._render(messages))
        if not ids:
            raise item_error(InvalidRequestError, index, "item has no tokens")
        return self._truncate(ids, index)

    # -- steps ------------------------------------------------------------------------------
    def _messages(self, item: PairItem | ConversationItem, index: int) -> list[Message]:
        if isinstance(item, ConversationItem):
            return list(item.messages)
        if not item.response:
            raise item_error(InvalidRequestError, index, "response is empty", field="response")
        prompt = item.prompt if isinstance(item.prompt, list) else [Message(role="user", content=item.prompt)]
        return [*prompt, Message(role="assistant", content=item.response)]

    def _render(self, messages: list[Message]) -> list[int]:
        if self.use_template:
            text = self.tokenizer.apply_chat_template(
                [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=False
            )
            return self._tokenize_text(text)
        text = self.spec.separator.join(m.content for m in messages)
        return self._tokenize_text(text)

    def _tokenize_text(self, text: str) -> list[int]:
        """Tokenize with the tokenizer's own special tokens, then collapse a duplicated leading BOS."""
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if self.bos_id is not None:
            while len(ids) >= 2 and ids[0] == self.bos_id and ids[1] == self.bos_id:
                ids.pop(0)
        return ids

    def _apply_eos(self, ids: list[int]) -> list[int]:
        if self.eos_id is None or self.spec.eos == "auto":
            return ids
        if self.spec.eos == "always" and (not ids or ids[-1] != self.eos_id):
            return [*ids, self.eos_id]
        if self.spec.eos == "never" and ids and ids[-1] == self.eos_id:
            return ids[:-1]
        return ids

    def _check_token_ids(self, ids: list[int], index: int) -> list[int]:
        for pos, tid in enumerate(ids):
            if not 0 <= tid < self.vocab_size:
                raise item_error(
                    InvalidRequestError,
                    index,
                    f"token id {tid} at position {pos} is outside the vocabulary [0, {self.vocab_size})",
                    field=f"input_ids[{pos}]",
                )
        return list(ids)

    def _truncate(self, ids: list[int], index: int) -> TokenizedItem:
        if len(ids) <= self.max_length:
            return TokenizedItem(tuple(ids), False)
        if self.spec.truncation == "error":
            raise item_error(
                ContextLengthExceededError,
                index,
                f"{len(ids)} tokens exceed max_length={self.max_length} (truncation policy 'error')",
            )
        return TokenizedItem(tuple(left_truncate(ids, self.max_length, self.bos_id)), True)
