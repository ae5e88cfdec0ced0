"""The four item forms of API.md, as strict pydantic models, and ``parse_item`` to tell them apart; and the steps item
of ``POST /v1/steps`` (a prompt and a solution's steps, for process reward models).

The models hold every check an item needs without the model's tokenizer (roles known, a prompt's message list not
empty, a conversation ending with the assistant's turn), so an item the HTTP edge validated is known good; what
needs the tokenizer (token ids in its vocabulary, an empty rendering) is checked where the item is tokenized.

Example::

    parse_item({"prompt": "2+2?", "response": "4"}, index=0)   # -> PairItem
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from .errors import InvalidRequestError, field_path, item_error, meant_error

KNOWN_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Message(_Strict):
    """A chat message as OpenAI's API writes one: its content a string or a list of text parts (joined by newlines,
    as vLLM renders them for a text-only model); an assistant's ``tool_calls`` (its content may then be null) and a
    tool result's ``tool_call_id`` and ``name`` go to the chat template as they are."""

    role: StrictStr
    tool_calls: list[dict[str, Any]] | None = None  # before content: its check reads them
    content: StrictStr | None = Field(None, validate_default=True)
    tool_call_id: StrictStr | None = None
    name: StrictStr | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in KNOWN_ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {sorted(KNOWN_ROLES)}")
        return role

    @field_validator("tool_calls")
    @classmethod
    def _an_assistants_calls(cls, calls: list | None, info: ValidationInfo) -> list | None:
        if calls is not None and info.data.get("role", "assistant") != "assistant":
            raise ValueError(f"only an assistant message carries tool_calls, not a {info.data['role']!r} message")
        return calls

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, content: Any, info: ValidationInfo) -> Any:
        if content is None and not info.data.get("tool_calls"):
            raise ValueError("content is required (null only beside an assistant's tool_calls)")
        if not isinstance(content, list):
            return content
        texts = []
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                raise ValueError(
                    f"part {k} is not a text part ({kind!r}); a reward model reads text: "
                    '{"type": "text", "text": "..."}'
                )
            texts.append(part["text"])
        return "\n".join(texts)


def _has_messages(prompt: str | list[Message]) -> str | list[Message]:
    if isinstance(prompt, list) and not prompt:
        raise ValueError("prompt has no messages")
    return prompt


# A prompt: text, or chat messages (at least one).
Prompt = Annotated[StrictStr | list[Message], AfterValidator(_has_messages)]


class PairItem(_Strict):
    """A prompt (string or chat messages) and one response to score."""

    prompt: Prompt
    response: StrictStr


class ConversationItem(_Strict):
    """A whole conversation whose last turn is the assistant's response."""

    messages: list[Message] = Field(min_length=1)

    @field_validator("messages")
    @classmethod
    def _ends_with_the_response(cls, messages: list[Message]) -> list[Message]:
        if messages[-1].role != "assistant":
            raise ValueError("the last message must have role 'assistant'")
        return messages


class TextItem(_Strict):
    """Already formatted text: no template is applied."""

    text: StrictStr


class TokensItem(_Strict):
    """Token ids from the reward model's own tokenizer."""

    input_ids: list[StrictInt] = Field(min_length=1)


class StepsItem(_Strict):
    """A prompt and a solution as its steps, for a process reward model (``POST /v1/steps``): one reward per step."""

    prompt: Prompt
    steps: list[StrictStr] = Field(min_length=1)


class LabelsItem(_Strict):
    """Formatted text or token ids read by a judge at its last position: the next-token probability of each of
    ``label_token_ids`` (under the whole vocabulary, or with ``apply_softmax`` over just those labels). One item of
    SGLang's ``/v1/score`` body; the edge builds it (no dict form: the native routes do not take it)."""

    input: StrictStr | list[StrictInt]
    label_token_ids: tuple[StrictInt, ...] = Field(min_length=1)
    apply_softmax: bool = False


class JudgedPairItem(_Strict):
    """A prompt and two responses, for a pairwise judge (``verdict_pair_template``): one input, one verdict. Built by
    ``POST /v1/preference`` (no dict form)."""

    prompt: Prompt
    response_a: StrictStr
    response_b: StrictStr


Item = PairItem | ConversationItem | TextItem | TokensItem
_FORMS: dict[frozenset[str], type[BaseModel]] = {
    frozenset({"prompt", "response"}): PairItem,
    frozenset({"messages"}): ConversationItem,
    frozenset({"text"}): TextItem,
    frozenset({"input_ids"}): TokensItem,
    frozenset({"prompt", "steps"}): StepsItem,
}
FORM_NAMES = {
    PairItem: "pair",
    ConversationItem: "conversation",
    TextItem: "text",
    TokensItem: "tokens",
    StepsItem: "steps",
    LabelsItem: "labels",
    JudgedPairItem: "judged pair",
}


def item_form(item: Item) -> str:
    return FORM_NAMES[type(item)]


def payload_size(obj: Any) -> int:
    """Characters of text plus token ids in an item (a model or its dict form), or in a list of them: a cheap
    measure of how long tokenizing it will take."""
    if isinstance(obj, str):
        return len(obj)
    if obj is None:  # a message's unset field
        return 0
    if isinstance(obj, BaseModel):
        obj = obj.__dict__
    if isinstance(obj, dict):
        return sum(payload_size(value) for value in obj.values())
    if isinstance(obj, list | tuple):
        return sum(payload_size(value) for value in obj)
    return 1


def parse_item(obj: Any, index: int = 0) -> Item | StepsItem | LabelsItem | JudgedPairItem:
    """Validate one item (a dict or an item model; ``{prompt, steps}`` too, and the ``BUILT_FORMS`` as models);
    errors name the item index."""
    if isinstance(obj, PairItem | ConversationItem | TextItem | TokensItem | StepsItem | LabelsItem | JudgedPairItem):
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
            first = meant_error(exc.errors())
            where = field_path(first["loc"])
            message = first["msg"].removeprefix("Value error, ")
            raise item_error(InvalidRequestError, index, f"{where}: {message}", field=where) from None
    return item
