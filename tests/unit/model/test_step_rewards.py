"""Step rewards of process reward models: every format equals a plain transformers forward at each separator (fp32,
1e-5) for batches mixing step counts, both padding sides, prefix sharing on and off; separators are token ids placed
by the server, so a step can neither hide one nor merge with one; left truncation keeps the last steps."""

from __future__ import annotations

import pytest
from checkpoints import unshared_rewards
from prm_checkpoints import SEPARATORS, format_settings, save_format_checkpoint

from rmserve.model import ContextLengthExceededError, InvalidRequestError, load_reward_model
from rmserve.model.errors import WrongModelKindError
from rmserve.model.planning import StepIds

TOL = 1e-5
PRM_FORMATS = ("qwen2_prm", "math_shepherd", "token_classification", "value_head_prm")
PROMPT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many?"
GROUP = [  # a GRPO-shaped group: one prompt, samples of different step counts, the first steps shared by some
    ["Natalia sold 48 / 2 = 24 clips in May.", "Altogether she sold 48 + 24 = 72 clips.", "The answer is 72."],
    ["Natalia sold 48 / 2 = 24 clips in May.", "So 72."],
    ["In May she sold 48 * 2 = 96 clips.", "Then 48 + 96 = 144.", "Hmm, let me check.", "The answer is 144."],
    ["72"],
]


@pytest.fixture(scope="module")
def checkpoints_by_format(tmp_path_factory):
    return {fmt: save_format_checkpoint(tmp_path_factory.mktemp(fmt), fmt) for fmt in PRM_FORMATS}


def load(checkpoints_by_format, fmt: str, **spec):
    out, reference, tok = checkpoints_by_format[fmt]
    settings = {"dtype": "fp32", "device": "cpu", "forward_overhead_tokens": 0, **format_settings(fmt), **spec}
    return load_reward_model(str(out), **settings), reference, tok


def items(group=GROUP, prompt=PROMPT):
    return [{"prompt": prompt, "steps": steps} for steps in group]


def expected(reference, ids: StepIds) -> list[float]:
    rewards = reference(list(ids))
    return [float(rewards[p]) for p in ids.readouts]


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("fmt", PRM_FORMATS)
def test_step_rewards_equal_the_transformers_reference(checkpoints_by_format, fmt, padding_side):
    rm, reference, _ = load(checkpoints_by_format, fmt, padding_side=padding_side)
    other = items([["Clips: 48.", "Half: 24."]], prompt="A different prompt about owls.")
    seqs = [rm.tokenize(item, i).input_ids for i, item in enumerate(items() + other)]
    assert [len(s.readouts) for s in seqs] == [3, 2, 4, 1, 2]
    want = [expected(reference, s) for s in seqs]
    shared = rm.engine.score_batch(seqs)  # the prompt once, each sample's steps on top
    assert rm.engine.stats.tokens_saved > 0 or rm.engine.stats.prefix_hits > 0
    whole = unshared_rewards(rm.engine, seqs)
    for got_shared, got_whole, ref in zip(shared, whole, want, strict=True):
        assert got_shared == pytest.approx(ref, abs=TOL)
        assert got_whole == pytest.approx(ref, abs=TOL)
    flat = [r for ref in want for r in ref]
    assert max(flat) - min(flat) > 1e-3  # the rewards differ: the comparison means something


@pytest.mark.parametrize("fmt", PRM_FORMATS)
def test_group_members_in_later_batches_reuse_the_cached_prompt(checkpoints_by_format, fmt):
    rm, reference, _ = load(checkpoints_by_format, fmt, reward_cache_items=0)
    seqs = [rm.tokenize(item, i).input_ids for i, item in enumerate(items())]
    first = rm.engine.score_batch(seqs[:1])
    saved_before = rm.engine.stats.tokens_saved
    rest = rm.engine.score_batch(seqs[1:])  # the prompt (and sample 0's first step, up to a separator) are cached
    assert rm.engine.stats.tokens_saved > saved_before
    for got, seq in zip(first + rest, seqs, strict=True):
        assert got == pytest.approx(expected(reference, seq), abs=TOL)


def test_formats_are_detected_from_the_checkpoint(checkpoints_by_format):
    names = {}
    for fmt in PRM_FORMATS:
        rm, _, _ = load(checkpoints_by_format, fmt)
        info = rm.info()
        assert info["kind"] == "process" and info["step_separator"] == SEPARATORS[fmt]
        names[fmt] = rm.reward_format.name
    assert names == {
        "qwen2_prm": "process-reward-model",
        "math_shepherd": "causal-lm-prm",
        "token_classification": "token-classification-prm",
        "value_head_prm": "value-head-prm",
    }


@pytest.mark.parametrize("fmt", ["token_classification", "qwen2_prm", "math_shepherd"])
def test_a_step_whose_text_holds_the_separator_is_rejected(checkpoints_by_format, fmt):
    rm, _, _ = load(checkpoints_by_format, fmt)
    steps = ["First step.", f"Second {SEPARATORS[fmt]} step.", "Third."]
    with pytest.raises(InvalidRequestError) as info:
        rm.tokenize({"prompt": PROMPT, "steps": steps}, index=2)
    assert info.value.status == 422 and info.value.param == "items[2].steps[1]"
    assert "separator" in info.value.message


def test_separators_are_token_ids_and_never_merge_with_their_neighbours(checkpoints_by_format):
    # A value-head PRM whose separator "s" merges with a step ending in "tea" when written as text ("teas" is
    # [tea, as] in this tokenizer): the server places its id after the step's own ids instead.
    rm, reference, tok = load(checkpoints_by_format, "value_head_prm", step_separator="s")
    sep = tok("s", add_special_tokens=False)["input_ids"][0]
    steps = ["tea", "more tea", "a cup of tea"]
    as_text = tok("".join(step + "s" for step in steps), add_special_tokens=False)["input_ids"]
    assert as_text.count(sep) < len(steps)  # the hazard is real: as text, separators vanish into their neighbours
    ids = rm.tokenize({"prompt": PROMPT, "steps": steps}).input_ids
    assert len(ids.readouts) == len(steps) and all(ids[p] == sep for p in ids.readouts)
    (got,) = rm.engine.score_batch([ids])
    assert len(got) == len(steps) and got == pytest.approx(expected(reference, ids), abs=TOL)


def test_left_truncation_keeps_the_last_steps(checkpoints_by_format):
    rm_full, reference, _ = load(checkpoints_by_format, "qwen2_prm")
    full = rm_full.tokenize(items()[2]).input_ids
    keep = full.readouts[1] + 3 - 1  # cut inside the prompt + first two steps: the second separator is lost
    rm, _, _ = load(checkpoints_by_format, "qwen2_prm", max_length=len(full) - keep)
    tokenized = rm.tokenize(items()[2])
    ids = tokenized.input_ids
    assert tokenized.truncated and len(ids) == len(full) - keep
    assert len(ids.readouts) == 2  # steps 0 and 1 lost their separators; steps 2 and 3 keep theirs
    assert ids[0] == rm.formatter.bos_id and list(ids[1:]) == list(full[keep + 1 :])
    assert [p + keep for p in ids.readouts] == list(full.readouts[2:])
    (got,) = rm.engine.score_batch([ids])
    assert got == pytest.approx(expected(reference, ids), abs=TOL)  # read at the kept separators, nowhere else
    strict, _, _ = load(checkpoints_by_format, "qwen2_prm", max_length=len(full) - keep, truncation="error")
    with pytest.raises(ContextLengthExceededError):
        strict.tokenize(items()[2])


def test_text_with_separators_scores_like_the_steps(checkpoints_by_format):
    """vLLM's /pooling sends text with the separators in it: a reward at each separator token."""
    rm, _, tok = load(checkpoints_by_format, "qwen2_prm")
    ids = rm.tokenize(items()[0]).input_ids
    from_tokens = rm.tokenize({"input_ids": list(ids)}).input_ids
    assert from_tokens == ids
    with pytest.raises(InvalidRequestError, match="no step separator"):
        rm.tokenize({"text": "no separator here"})


def test_kinds_refuse_each_others_items(checkpoints_by_format, tmp_path_factory):
    rm, _, _ = load(checkpoints_by_format, "qwen2_prm")
    with pytest.raises(WrongModelKindError):
        rm.tokenize({"prompt": PROMPT, "response": "72"})
    out, _, _ = save_format_checkpoint(tmp_path_factory.mktemp("outcome"), "qwen2_rm")
    outcome = load_reward_model(str(out), dtype="fp32", device="cpu", forward_overhead_tokens=0)
    with pytest.raises(WrongModelKindError) as info:
        outcome.tokenize(items()[0])
    assert info.value.status == 400


def test_reward_cache_answers_a_repeated_item_with_its_step_rewards(checkpoints_by_format):
    rm, _, _ = load(checkpoints_by_format, "math_shepherd", reward_cache_items=100)
    seqs = [rm.tokenize(item).input_ids for item in items()]
    first = rm.engine.score_batch(seqs)
    hits = rm.engine.stats.reward_cache_hits
    again = rm.engine.score_batch(seqs)
    assert again == first and rm.engine.stats.reward_cache_hits == hits + len(seqs)
    moved = StepIds(seqs[0], seqs[0].readouts[1:])  # the same ids read elsewhere: not the same outcome
    (fewer,) = rm.engine.score_batch([moved])
    assert fewer == pytest.approx(first[0][1:], abs=TOL)


def test_batch_invariant_step_rewards(checkpoints_by_format):
    rm, reference, _ = load(checkpoints_by_format, "qwen2_prm", batch_invariant=True)
    seqs = [rm.tokenize(item).input_ids for item in items()]
    together = rm.engine.score_batch(seqs)
    alone = [unshared_rewards(rm.engine, [seq])[0] for seq in seqs]
    assert together == alone
    for got, seq in zip(together, seqs, strict=True):
        assert got == pytest.approx(expected(reference, seq), abs=TOL)


def test_step_head_reads_only_separators(checkpoints_by_format):
    """A planned row never starts past its first separator: the prompt is shared, the steps are each item's."""
    rm, _, _ = load(checkpoints_by_format, "value_head_prm")
    seqs = [rm.tokenize(item).input_ids for item in items()]
    plan = rm.engine.plan(seqs)
    for row in plan.items:
        assert row.start <= row.seq.readouts[0]
