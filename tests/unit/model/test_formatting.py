"""Templates, BOS/EOS policy, truncation and item validation."""

from __future__ import annotations

import pytest

from rmserve.model import ContextLengthExceededError, InvalidRequestError, ItemFormatter, ModelSpec, left_truncate

PAIR = {"prompt": "Tell me about owls.", "response": "Gladly! Owls have a long history."}


def _fmt(tokenizer, **spec):
    return ItemFormatter(
        tokenizer, ModelSpec(**spec), max_length=spec.pop("max_length", 4096), vocab_size=len(tokenizer)
    )


@pytest.fixture(scope="module")
def chat_tok():
    from checkpoints import build_tokenizer

    return build_tokenizer("chat")


def test_template_renders_bos_once(chat_tok):
    rendered = chat_tok.apply_chat_template(
        [{"role": "user", "content": PAIR["prompt"]}, {"role": "assistant", "content": PAIR["response"]}],
        tokenize=False,
    )
    assert rendered.startswith("<s>")
    naive = chat_tok(rendered)["input_ids"]
    assert naive[:2] == [chat_tok.bos_token_id] * 2  # the trap: template BOS + tokenizer BOS
    ids = _fmt(chat_tok).encode(PAIR).input_ids
    assert ids[0] == chat_tok.bos_token_id and ids[1] != chat_tok.bos_token_id
    assert ids.count(chat_tok.bos_token_id) == 1


def test_text_form_with_bos_in_text_is_not_doubled(chat_tok):
    text = "<s><|user|>Hi</s><|assistant|>Hello</s>"
    ids = _fmt(chat_tok).encode({"text": text}).input_ids
    assert ids.count(chat_tok.bos_token_id) == 1
    # and text without BOS gets the one the tokenizer normally adds
    assert _fmt(chat_tok).encode({"text": "Hello"}).input_ids[0] == chat_tok.bos_token_id


def test_pair_and_conversation_forms_agree(chat_tok):
    conv = {
        "messages": [{"role": "user", "content": PAIR["prompt"]}, {"role": "assistant", "content": PAIR["response"]}]
    }
    listed = {"prompt": [{"role": "user", "content": PAIR["prompt"]}], "response": PAIR["response"]}
    fmt = _fmt(chat_tok)
    assert fmt.encode(PAIR) == fmt.encode(conv) == fmt.encode(listed)


@pytest.mark.parametrize("template", ["chat", "raw"])
def test_an_empty_response_is_scored_as_the_assistants_empty_turn(chat_tok, template):
    """A rollout that ended at once: the pair form renders what the conversation form renders for an empty assistant
    message (the template's assistant turn, then EOS), never an error that would fail its whole request."""
    fmt = _fmt(chat_tok, template=template)
    empty = fmt.encode({"prompt": PAIR["prompt"], "response": ""}, index=3)
    conv = {"messages": [{"role": "user", "content": PAIR["prompt"]}, {"role": "assistant", "content": ""}]}
    assert empty == fmt.encode(conv)
    prompt_only = fmt.encode({"text": PAIR["prompt"]}).input_ids
    assert len(empty.input_ids) > len(prompt_only) - 1  # more than the prompt: the turn's markers or separator
    if template == "chat":
        rendered = chat_tok.apply_chat_template(conv["messages"], tokenize=False)
        assert "<|assistant|>" in rendered and empty.input_ids == tuple(chat_tok(rendered)["input_ids"][1:])


# Gemma's template refuses a system message; Mistral's and Llama 2's, roles that do not alternate.
REFUSING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
)


@pytest.mark.parametrize(
    ("item", "param", "reason"),
    [
        (
            {
                "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                "response": "Yo",
            },
            "items[3].prompt",
            "System role not supported",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            },  # noqa: E501
            "items[3].messages",
            "roles must alternate",
        ),
    ],
)
def test_a_chat_template_that_refuses_the_messages_is_the_callers_error(chat_tok, item, param, reason):
    """The template's ``raise_exception`` becomes a 422 naming the item's field with the template's reason (it was a
    jinja2 error, which the server answered as a 500)."""
    import copy

    tok = copy.deepcopy(chat_tok)
    tok.chat_template = REFUSING_TEMPLATE
    fmt = _fmt(tok)
    with pytest.raises(InvalidRequestError, match=reason) as info:
        fmt.encode(item, index=3)
    assert (info.value.param, info.value.status) == (param, 422)
    assert info.value.message.startswith(f"{param}: the model's chat template refuses these messages")
    assert fmt.encode({"prompt": "Hi", "response": "Yo"}).input_ids  # what it accepts still renders


OWL_TURNS = [
    {"role": "user", "content": "Tell me about owls."},
    {"role": "assistant", "content": "Owls hunt at night."},
]
# A template that renders an assistant's tool calls and a tool result's id (as Qwen's and Llama 3.1's do).
TOOL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{% if m.content %}{{ m.content }}{% endif %}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ c.function.name }} {{ c.function.arguments }}</call>"
    "{% endfor %}{% endif %}{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %}{{ eos_token }}{% endfor %}"
)
TOOL_CONVERSATION = [
    {"role": "user", "content": "How many owls?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "count", "arguments": '{"bird": "owl"}'}}],
    },
    {"role": "tool", "content": "7", "tool_call_id": "c1", "name": "count"},
    {"role": "assistant", "content": "There are 7 owls."},
]


def test_content_as_text_parts_is_the_joined_text(chat_tok):
    """OpenAI's content parts: text parts joined by newlines (as vLLM renders them for a text-only model)."""
    fmt = _fmt(chat_tok)
    parts = [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "about owls."}]
    as_parts = fmt.encode({"messages": [{"role": "user", "content": parts}, OWL_TURNS[1]]})
    as_text = fmt.encode({"messages": [{"role": "user", "content": "Tell me\nabout owls."}, OWL_TURNS[1]]})
    assert as_parts == as_text
    image = [{"type": "image_url", "image_url": {"url": "http://x/owl.png"}}]
    with pytest.raises(InvalidRequestError, match="not a text part") as info:
        fmt.encode({"prompt": [{"role": "user", "content": image}], "response": "An owl."}, index=2)
    assert info.value.param == "items[2].prompt[0].content"


def test_tool_calls_reach_a_template_that_renders_them(chat_tok):
    import copy

    tok = copy.deepcopy(chat_tok)
    tok.chat_template = TOOL_TEMPLATE
    ids = _fmt(tok).encode({"messages": TOOL_CONVERSATION}).input_ids
    rendered = tok.apply_chat_template(
        [{k: v for k, v in m.items() if v is not None} for m in TOOL_CONVERSATION], tokenize=False
    )
    assert '<call>count {"bird": "owl"}</call>' in rendered and "[c1]" in rendered
    assert ids == tuple(tok(rendered)["input_ids"][1:])  # the template's BOS once


@pytest.mark.parametrize("template", ["chat", "raw"])
def test_tool_calls_a_template_would_drop_are_refused(chat_tok, template):
    """The demo's template renders content only and ``raw`` joins contents: the calls would vanish from what the
    reward model reads, so the item is refused (naming its messages), not scored without them."""
    with pytest.raises(InvalidRequestError, match="tool_calls") as info:
        _fmt(chat_tok, template=template).encode({"messages": TOOL_CONVERSATION}, index=4)
    assert (info.value.param, info.value.status) == ("items[4].messages", 422)


@pytest.mark.parametrize(
    ("message", "match"),
    [
        ({"role": "user"}, "content is required"),
        ({"role": "user", "content": "x", "tool_calls": [{"type": "function"}]}, "only an assistant message"),
        ({"role": "user", "content": "x", "reasoning": "y"}, "Extra inputs"),
    ],
)
def test_malformed_messages_are_refused(chat_tok, message, match):
    with pytest.raises(InvalidRequestError, match=match):
        _fmt(chat_tok).encode({"messages": [message, OWL_TURNS[1]]})


def test_raw_join_uses_separator(chat_tok):
    ids = _fmt(chat_tok, template="raw", separator=" || ").encode(PAIR).input_ids
    assert ids == tuple(chat_tok(PAIR["prompt"] + " || " + PAIR["response"])["input_ids"])


@pytest.mark.parametrize("template", ["chat", "raw"])
def test_eos_policies(chat_tok, template):
    eos = chat_tok.eos_token_id
    always = _fmt(chat_tok, template=template, eos="always").encode(PAIR).input_ids
    never = _fmt(chat_tok, template=template, eos="never").encode(PAIR).input_ids
    assert always[-1] == eos and never[-1] != eos
    assert always.count(eos) == never.count(eos) + 1
    auto = _fmt(chat_tok, template=template).encode(PAIR).input_ids
    assert (auto[-1] == eos) == (template == "chat")  # auto: as the template renders it; raw adds none


def test_chat_template_required_when_asked():
    from checkpoints import build_tokenizer

    with pytest.raises(InvalidRequestError, match="no chat template"):
        _fmt(build_tokenizer("raw"), template="chat")


def test_left_truncation_keeps_bos_and_response_end(chat_tok):
    long = {"prompt": "Tell me about owls. " * 50, "response": "Gladly! Owls have a long history."}
    full = _fmt(chat_tok).encode(long).input_ids
    tok = _fmt(chat_tok, max_length=40).encode(long)
    assert tok.truncated and len(tok) == 40
    assert tok.input_ids[0] == chat_tok.bos_token_id
    assert tok.input_ids[1:] == full[-39:]  # the whole end, response and its EOS included
    assert not _fmt(chat_tok, max_length=len(full)).encode(long).truncated


def test_left_truncate_without_bos():
    assert left_truncate([5, 6, 7, 8], 2, bos_id=1) == [7, 8]
    assert left_truncate([1, 6, 7, 8], 3, bos_id=1) == [1, 7, 8]
    assert left_truncate([1, 6], 3, bos_id=1) == [1, 6]


def test_truncation_policy_error(chat_tok):
    with pytest.raises(ContextLengthExceededError) as info:
        _fmt(chat_tok, max_length=10, truncation="error").encode({"text": "Owls " * 40}, index=4)
    assert info.value.index == 4 and info.value.message.startswith("items[4]: ") and info.value.status == 400


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ({"prompt": "Hi"}, "match no item form"),
        ({"prompt": "Hi", "response": 5}, "response"),
        ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role"),
        ({"messages": [{"role": "user", "content": "x"}]}, "last message"),
        ({"messages": []}, "messages"),
        ({"prompt": [], "response": "x"}, "no messages"),
        ({"input_ids": [1, 2, 100000]}, "outside the vocabulary"),
        ({"input_ids": [1, -3]}, "outside the vocabulary"),
        ({"input_ids": []}, "input_ids"),
        ({"text": ""}, "text is empty"),
        ({"text": "a", "extra": 1}, "match no item form"),
        ("just a string", "expected an object"),
    ],
)
def test_invalid_items_raise_typed_errors_naming_the_index(chat_tok, item, match):
    with pytest.raises(InvalidRequestError, match=match) as info:
        _fmt(chat_tok).encode(item, index=7)
    assert info.value.index == 7 and info.value.message.startswith("items[7]")
    assert info.value.param.startswith("items[7]") and info.value.type == "invalid_request"


def test_tokenizer_without_pad_token_scores(demo_model):
    assert demo_model.tokenizer.pad_token_id is None
    rewards = demo_model.score([PAIR, {"prompt": "Hi", "response": "Go away."}])
    assert len(rewards) == 2 and rewards[0] != rewards[1]


def test_payload_size_counts_text_and_token_ids_of_any_item_form_as_dict_or_model():
    from rmserve.model.items import parse_item, payload_size

    chat = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]}
    items = [{"prompt": "abc", "response": "de"}, {"input_ids": [1, 2, 3]}, {"text": "x" * 10}, chat]
    expected = [3 + 2, 3, 10, 4 + 5 + 9 + 2]
    assert [payload_size(item) for item in items] == expected
    assert [payload_size(parse_item(item)) for item in items] == expected
    assert payload_size(items) == sum(expected)
