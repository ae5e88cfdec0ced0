"""The four item forms of API.md, as strict pydantic models, and ``parse_item`` to tell them apart.

Example::

    parse_item({"prompt": "2+2?", "response": "4"}, index=0)   # -> PairItem
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from .errors import InvalidRequestError, item_error

KNOWN_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Message(_Strict):
    role: StrictStr
    content: StrictStr


class PairItem(_Strict):
    """A prompt (string or chat messages) and one response to score."""

    prompt: StrictStr | list[Message]
    response: StrictStr


class ConversationItem(_Strict):
    """A whole conversation whose last turn is the assistant's response."""

    messages: list[Message] = Field(min_length=1)


class TextItem(_Strict):
    """Already formatted text: no template is applied."""

    text: StrictStr


class TokensItem(_Strict):
    """Token ids from the reward model's own tokenizer."""

    input_ids: list[StrictInt] = Field(min_length=1)


Item = PairItem | ConversationItem | TextItem | TokensItem
_FORMS: dict[frozenset[str], type[BaseModel]] = {
    frozenset({"prompt", "response"}): PairItem,
    frozenset({"messages"}): ConversationItem,
    frozenset({"text"}): TextItem,
    frozenset({"input_ids"}): TokensItem,
}
FORM_NAMES = {PairItem: "pair", ConversationItem: "conversation", TextItem: "text", TokensItem: "tokens"}


def item_form(item: Item) -> str:
    return FORM_NAMES[type(item)]


def payload_size(obj: Any) -> int:
    """Characters of text plus token ids in an item (a model or its dict form), or in a list of them: a cheap
    measure of how long tokenizing it will take."""
    if isinstance(obj, str):
        return len(obj)
    if isinstance(obj, BaseModel):
        obj = obj.__dict__
    if isinstance(obj, dict):
        return sum(payload_size(value) for value in obj.values())
    if isinstance(obj, list | tuple):
        return sum(payload_size(value) for value in obj)
    return 1


def parse_item(obj: Any, index: int = 0) -> Item:
    """Validate one item (a dict or an item model); errors name the item index."""
    if isinstance(obj, PairItem | ConversationItem | TextItem | TokensItem):
        item = obj
    else:
        if not isinstance(obj, dict):
            raise item_error(InvalidRequestError, index, f"expected an object, got {type(obj).__name__}")
        cls = _FORMS.get(frozenset(obj))
        if cls is None:
            raise item_error(
                InvalidRequestError,
                index,
                f"fields {sorted(obj)} match no item form; use exactly one of "
                "{prompt, response}, {messages}, {text}, {input_ids}",
            )
        try:
            item = cls.model_validate(obj)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
            raise item_error(InvalidRequestError, index, f"{where}: {first['msg']}", field=where) from None
    _check_roles(item, index)
    return item


def _check_roles(item: Item, index: int) -> None:
    messages: list[Message] = []
    if isinstance(item, PairItem) and isinstance(item.prompt, list):
        messages = item.prompt
        if not messages:
            raise item_error(InvalidRequestError, index, "prompt has no messages", field="prompt")
    elif isinstance(item, ConversationItem):
        messages = item.messages
        if messages[-1].role != "assistant":
            raise item_error(
                InvalidRequestError, index, "the last message must have role 'assistant'", field="messages"
            )
    for i, m in enumerate(messages):
        if m.role not in KNOWN_ROLES:
            field = f"{'prompt' if isinstance(item, PairItem) else 'messages'}[{i}].role"
            raise item_error(
                InvalidRequestError, index, f"unknown role {m.role!r}; expected one of {sorted(KNOWN_ROLES)}", field
            )
