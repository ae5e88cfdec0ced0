"""Turn an item into the token ids the reward model scores: template, BOS/EOS policy, truncation.

The rules that keep rewards right:

* a chat template is rendered exactly once, and a BOS token is never duplicated (templates that
  write ``<s>`` themselves plus a tokenizer that adds one are a classic silent reward shift);
* over-long items are truncated from the **left** (oldest prompt tokens first), keeping a leading
  BOS and the whole end of the response, and flagged; policy ``error`` rejects them instead;
* a process reward model's steps (``StepsItem``) are tokenized one by one, each followed by the step separator
  **as its token id** (never as text that could merge with its neighbours), and the separators' positions go
  with the ids (``StepIds``); a step whose own text tokenizes into the separator is rejected; left truncation
  keeps the last steps (the separators it cuts have no reward);
* a judge (``verdict_tokens`` set) also takes ``LabelsItem`` (formatted text or ids, read by the next-token
  probabilities of the label ids it names: ``LabelIds``, each label id checked against the vocabulary) and, when
  pairwise (``verdict_pair_template``), ``JudgedPairItem`` (the template filled with the prompt and both responses,
  scored as formatted text).

Example::

    fmt = ItemFormatter(tokenizer, spec, max_length=2048, vocab_size=32000)
    tok = fmt.encode({"prompt": "Hi", "response": "Hello!"}, index=0)
    tok.input_ids, tok.truncated
    prm = ItemFormatter(tokenizer, spec, max_length=2048, vocab_size=32000, step_separator_id=151651)
    prm.encode({"prompt": "2+2?", "steps": ["2+2=4.", "The answer is 4."]}).input_ids.readouts   # two separators
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import ContextLengthExceededError, InvalidRequestError, WrongModelKindError, item_error
from .items import (
    ConversationItem,
    Item,
    JudgedPairItem,
    LabelsItem,
    Message,
    PairItem,
    StepsItem,
    TextItem,
    TokensItem,
    parse_item,
)
from .planning import LabelIds, StepIds
from .spec import ModelSpec

# Stands for the assistant's turn while a chat template renders a steps item (cut there; the steps follow as ids).
STEPS_MARKER = "\u2063rmserve-steps\u2063"
PAIR_PLACEHOLDER = re.compile(r"\{(prompt|response_a|response_b)\}")  # verdict_pair_template's (spec.py)


@dataclass(frozen=True, slots=True)
class TokenizedItem:
    """One item ready for the engine (``StepIds`` for a process reward model: the ids and its separators)."""

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

    def __init__(
        self, tokenizer: Any, spec: ModelSpec, *, max_length: int, vocab_size: int, step_separator_id: int | None = None
    ):
        self.tokenizer = tokenizer
        self.step_separator_id = step_separator_id  # set for a process reward model
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
    def encode(self, item: Item | StepsItem | dict, index: int = 0) -> TokenizedItem:
        """Validate, render, tokenize and truncate one item; errors name ``index``.

        A process reward model takes steps items, and text or token items whose separators are already in them (its
        rewards are read at each separator); an outcome model takes the four item forms."""
        item = parse_item(item, index)
        if isinstance(item, LabelsItem | JudgedPairItem):
            return self._encode_for_judge(item, index)
        process = self.step_separator_id is not None
        if isinstance(item, StepsItem):
            if not process:
                raise WrongModelKindError("this model is an outcome reward model: it scores items, not steps")
            return self._encode_steps(item, index)
        if process and not isinstance(item, TextItem | TokensItem):
            raise WrongModelKindError("this model is a process reward model: it scores steps (POST /v1/steps)")
        if isinstance(item, TokensItem):
            ids = self._check_token_ids(item.input_ids, index)
        elif isinstance(item, TextItem):
            if not item.text:
                raise item_error(InvalidRequestError, index, "text is empty", field="text")
            ids = self._tokenize_text(item.text)
        else:
            messages = self._messages(item, index)
            field = "messages" if isinstance(item, ConversationItem) else "prompt"
            ids = self._apply_eos(self._render(messages, index, field))
        if not ids:
            raise item_error(InvalidRequestError, index, "item has no tokens")
        if process:  # separators already in the text (vLLM's /pooling): a reward at each
            return self._truncate_steps(ids, [p for p, t in enumerate(ids) if t == self.step_separator_id], index)
        return self._truncate(ids, index)

    # -- judges -------------------------------------------------------------------------------
    def _encode_for_judge(self, item: LabelsItem | JudgedPairItem, index: int) -> TokenizedItem:
        """A judge's input: ``LabelsItem`` read by its labels' probabilities, ``JudgedPairItem`` by the verdict."""
        if self.spec.verdict_tokens is None:
            raise WrongModelKindError(
                "this model is not a judge: serve a causal LM with verdict_tokens to read label probabilities",
                param="model",
            )
        if isinstance(item, JudgedPairItem):
            return self._truncate(self._tokenize_text(self._fill_pair_template(item, index)), index)
        self._check_token_ids(list(item.label_token_ids), index, field="label_token_ids")
        if isinstance(item.input, str):
            ids = self._tokenize_text(item.input)
        else:
            ids = self._check_token_ids(item.input, index)
        if not ids:
            raise item_error(InvalidRequestError, index, "item has no tokens")
        tokenized = self._truncate(ids, index)
        labelled = LabelIds(tokenized.input_ids, item.label_token_ids, whole_vocabulary=not item.apply_softmax)
        return TokenizedItem(labelled, tokenized.truncated)

    def _fill_pair_template(self, item: JudgedPairItem, index: int) -> str:
        template = self.spec.verdict_pair_template
        if template is None:
            raise WrongModelKindError(
                "this judge is pointwise: set verdict_pair_template to judge pairs", param="model"
            )
        prompt = item.prompt if isinstance(item.prompt, str) else self._joined(item.prompt, index, "prompt")
        values = {"prompt": prompt, "response_a": item.response_a, "response_b": item.response_b}
        return PAIR_PLACEHOLDER.sub(lambda match: values[match.group(1)], template)

    # -- process reward models ----------------------------------------------------------------
    def _encode_steps(self, item: StepsItem, index: int) -> TokenizedItem:
        """The prompt's ids (templated: the assistant turn's start), then each step's ids and the separator id."""
        separator = self.step_separator_id
        ids = self._steps_prefix(item, index)
        readouts = []
        for j, step in enumerate(item.steps):
            if not step:
                raise item_error(InvalidRequestError, index, "step is empty", field=f"steps[{j}]")
            step_ids = list(self.tokenizer(step, add_special_tokens=False)["input_ids"])
            if separator in step_ids:
                text = self.tokenizer.convert_ids_to_tokens(separator)
                raise item_error(
                    InvalidRequestError,
                    index,
                    f"the step's text tokenizes into the step separator {text!r} (id {separator}); the server places "
                    "separators itself, so remove it from the step",
                    field=f"steps[{j}]",
                )
            ids += step_ids
            readouts.append(len(ids))
            ids.append(separator)
        return self._truncate_steps(ids, readouts, index)

    def _steps_prefix(self, item: StepsItem, index: int) -> list[int]:
        prompt = item.prompt if isinstance(item.prompt, list) else [Message(role="user", content=item.prompt)]
        if not self.use_template:
            return self._tokenize_text(self._joined(prompt, index, "prompt"))
        text = self._apply_template([*prompt, Message(role="assistant", content=STEPS_MARKER)], index, "prompt")
        if STEPS_MARKER not in text:
            raise InvalidRequestError("the chat template does not render the assistant's turn; use template 'raw'")
        return self._tokenize_text(text[: text.index(STEPS_MARKER)])

    def _truncate_steps(self, ids: list[int], readouts: list[int], index: int) -> TokenizedItem:
        """Left truncation that keeps the last steps: the separators it cuts lose their readout (the item reports how
        many by the rewards it gets back)."""
        if not readouts:
            raise item_error(InvalidRequestError, index, "the text holds no step separator: no step to score")
        if len(ids) <= self.max_length:
            return TokenizedItem(StepIds(ids, readouts), False)
        if self.spec.truncation == "error":
            raise item_error(
                ContextLengthExceededError,
                index,
                f"{len(ids)} tokens exceed max_length={self.max_length} (truncation policy 'error')",
            )
        kept = left_truncate(ids, self.max_length, self.bos_id)
        lead = 1 if self.bos_id is not None and ids[0] == self.bos_id else 0  # the BOS it keeps in front
        cut = len(ids) - (len(kept) - lead)  # ids[cut:] are kept, after the lead
        return TokenizedItem(StepIds(kept, [p - cut + lead for p in readouts if p >= cut]), True)

    # -- steps ------------------------------------------------------------------------------
    def _messages(self, item: PairItem | ConversationItem, index: int) -> list[Message]:
        if isinstance(item, ConversationItem):
            return list(item.messages)
        # An empty response is a rollout that ended at once: scored as the assistant's empty turn (as the same
        # conversation in the messages form is), never refused, so one empty sample cannot fail its request.
        prompt = item.prompt if isinstance(item.prompt, list) else [Message(role="user", content=item.prompt)]
        return [*prompt, Message(role="assistant", content=item.response)]

    def _render(self, messages: list[Message], index: int, field: str) -> list[int]:
        if self.use_template:
            return self._tokenize_text(self._apply_template(messages, index, field))
        return self._tokenize_text(self._joined(messages, index, field))

    def _joined(self, messages: list[Message], index: int, field: str) -> str:
        """The messages' contents joined by ``separator`` (no chat template). Tool calls have no text without a
        template: refused, never dropped from what the reward model reads."""
        if any(m.tool_calls for m in messages):
            raise item_error(
                InvalidRequestError,
                index,
                "tool_calls need the model's chat template (without one only the messages' contents are joined); "
                "send the conversation as formatted text",
                field=field,
            )
        return self.spec.separator.join(m.content or "" for m in messages)

    def _apply_template(self, messages: list[Message], index: int, field: str) -> str:
        """The chat template's text of ``messages`` (the fields each message has; none set to null). A template that
        refuses them (``raise_exception``: Gemma's "System role not supported", Mistral's and Llama 2's roles that
        must alternate) is the caller's to fix: a 422 naming the item's ``field`` with the template's own reason, not
        a server error. So is a template that leaves an assistant's ``tool_calls`` out of its text: the reward would
        not see them."""
        text = self._template_text([m.model_dump(exclude_none=True) for m in messages], index, field)
        if any(m.tool_calls for m in messages):
            bare = [m.model_dump(exclude_none=True, exclude={"tool_calls"}) for m in messages]
            try:
                unchanged = self._template_text(bare, index, field) == text
            except InvalidRequestError:  # the template needs them: it renders them
                unchanged = False
            if unchanged:
                raise item_error(
                    InvalidRequestError,
                    index,
                    "the model's chat template does not render tool_calls, so the reward would not see them; send the "
                    "conversation as formatted text",
                    field=field,
                )
        return text

    def _template_text(self, messages: list[dict], index: int, field: str) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        except TemplateError as exc:
            raise item_error(
                InvalidRequestError, index, f"the model's chat template refuses these messages: {exc}", field=field
            ) from None

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

    def _check_token_ids(self, ids: list[int], index: int, field: str = "input_ids") -> list[int]:
        """``ids`` when each is in the vocabulary; else an error naming ``field[position]`` of the first that is not
        (an item's ``input_ids``, a judge's ``label_token_ids``)."""
        for pos, tid in enumerate(ids):
            if not 0 <= tid < self.vocab_size:
                raise item_error(
                    InvalidRequestError,
                    index,
                    f"token id {tid} at position {pos} is outside the vocabulary [0, {self.vocab_size})",
                    field=f"{field}[{pos}]",
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
