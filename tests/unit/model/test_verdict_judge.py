"""Verdict-token scoring of a causal-LM judge (issue 19 item 3, settings form): the reward is the probability of the
first verdict token at the end of the judge's input, softmax over just the verdict tokens or over the whole
vocabulary; equal to softmax over transformers' logits at the last position (fp32, 1e-5), both padding sides, prefix
sharing on and off, bitwise batch-independent in batch-invariant mode."""

from __future__ import annotations

import pytest
import torch
from checkpoints import last_logits, save_judge_checkpoint, unshared_rewards

from rmserve.model import load_reward_model
from rmserve.model.errors import InvalidRequestError, WrongModelKindError
from rmserve.model.formatting import ItemFormatter
from rmserve.model.items import JudgedPairItem, LabelsItem

TOL = 1e-5
JUDGE = (
    "<|user|>Is this answer correct? Question: what is 2 + 3? Answer: {answer}. Reply A (yes) or B (no).</s>"
    "<|assistant|>"
)
ANSWERS = ["5", "6", "five", "It is 5, since 2 + 3 = 5", "23"]


@pytest.fixture(scope="module")
def judge_checkpoint(tmp_path_factory):
    out, model, tok = save_judge_checkpoint(tmp_path_factory.mktemp("judge"))
    return out, lambda ids: last_logits(model, ids), tok


def judge(checkpoint, verdicts: str, **spec):
    out, _, _ = checkpoint
    settings = {"dtype": "fp32", "device": "cpu", "forward_overhead_tokens": 0, "verdict_tokens": verdicts, **spec}
    return load_reward_model(str(out), **settings)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize(("verdicts", "softmax"), [("A,B", True), ("A,B,C", True), ("A,B", False)])
def test_verdict_probability_equals_the_reference(judge_checkpoint, verdicts, softmax, padding_side):
    _, last_logits, tok = judge_checkpoint
    rm = judge(judge_checkpoint, verdicts, verdict_softmax=softmax, padding_side=padding_side)
    assert rm.info()["kind"] == "outcome" and rm.reward_format.name == "verdict-judge"
    labels = [tok.convert_tokens_to_ids(t) for t in verdicts.split(",")]
    seqs = [rm.tokenize({"text": JUDGE.format(answer=a)}).input_ids for a in ANSWERS]
    want = []
    for ids in seqs:
        logits = last_logits(ids)
        probs = torch.softmax(logits[labels], dim=-1) if softmax else torch.softmax(logits, dim=-1)[labels]
        want.append(float(probs[0]))
    shared = rm.engine.score_batch(seqs)  # the judge's instructions computed once
    whole = unshared_rewards(rm.engine, seqs)
    assert shared == pytest.approx(want, abs=TOL) and whole == pytest.approx(want, abs=TOL)
    assert max(want) - min(want) > 1e-4 and all(0 < w < 1 for w in want)


@pytest.mark.parametrize("softmax", [True, False])
def test_verdicts_are_batch_invariant(judge_checkpoint, softmax):
    rm = judge(judge_checkpoint, "A,B,C", verdict_softmax=softmax, batch_invariant=True)
    items = [{"text": JUDGE.format(answer=a)} for a in ANSWERS]
    items += [LabelsItem(input=JUDGE.format(answer=a), label_token_ids=(4, 9), apply_softmax=softmax) for a in ANSWERS]
    together = rm.score(items)
    alone = [unshared_rewards(rm.engine, [rm.tokenize(item).input_ids])[0] for item in items]
    assert together == alone


@pytest.mark.parametrize("apply_softmax", [False, True])
def test_label_probabilities_per_item_equal_the_reference(judge_checkpoint, apply_softmax):
    """Label ids named per item (SGLang's body): P(label) under the whole vocabulary or softmax over the labels;
    the same text with other labels, or the other normalisation, is its own answer (duplicates, reward cache)."""
    _, last_logits, tok = judge_checkpoint
    rm = judge(judge_checkpoint, "A,B")
    texts = [JUDGE.format(answer=a) for a in ANSWERS[:3]]
    label_sets = [(5, 17, 42), (17, 5), (len(tok) - 1,)]
    items = [
        LabelsItem(input=text, label_token_ids=labels, apply_softmax=apply_softmax)
        for text in texts
        for labels in label_sets
    ]
    for _ in range(2):  # the second time from the reward cache
        got = rm.score(items)
        for item, probs in zip(items, got, strict=True):
            logits = last_logits(rm.tokenize(item).input_ids)
            ids = list(item.label_token_ids)
            want = torch.softmax(logits[ids], -1) if apply_softmax else torch.softmax(logits, -1)[ids]
            assert probs == pytest.approx(want.tolist(), abs=TOL)


def test_labels_need_a_judge_and_known_ids(judge_checkpoint):
    rm = judge(judge_checkpoint, "A,B")
    vocab = rm.formatter.vocab_size
    with pytest.raises(InvalidRequestError) as err:
        rm.score([LabelsItem(input="Is it?", label_token_ids=(1, vocab))])
    assert err.value.field == "label_token_ids[1]"
    plain = rm.spec.model_copy(update={"verdict_tokens": None})
    with pytest.raises(WrongModelKindError):
        ItemFormatter(rm.tokenizer, plain, max_length=64, vocab_size=vocab).encode(
            LabelsItem(input="Is it?", label_token_ids=(1,))
        )


def test_pairwise_judge_reads_one_templated_input(judge_checkpoint):
    _, last_logits, tok = judge_checkpoint
    template = "<|user|>Question: {prompt} A: {response_a} B: {response_b} Which is better?</s><|assistant|>"
    rm = judge(judge_checkpoint, "A,B", verdict_pair_template=template)
    assert rm.info()["judge"] == "pairwise"
    pair = JudgedPairItem(prompt="what is 2 + 3?", response_a="5", response_b="{response_a} six")
    (got,) = rm.score([pair])
    text = "<|user|>Question: what is 2 + 3? A: 5 B: {response_a} six Which is better?</s><|assistant|>"  # filled once
    labels = [tok.convert_tokens_to_ids(t) for t in ("A", "B")]
    assert got == pytest.approx(float(torch.softmax(last_logits(rm.tokenize({"text": text}).input_ids)[labels], -1)[0]))
    with pytest.raises(ValueError, match="placeholders"):
        judge(judge_checkpoint, "A,B", verdict_pair_template="{prompt} {response_a}")


def test_the_whole_vocabulary_stays_in_the_checkpoints_dtype_and_gives_fp32_logits():
    """A judge's whole lm_head is not copied to fp32 (2.2 GB for a 152k x 3584 head): the runner's ``head.float()``
    leaves it bf16, its logits are those of the fp32 weight, over several blocks of rows and for chosen rows."""
    from rmserve.model.heads import Vocabulary

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(70, 16, generator=generator).to(torch.bfloat16)
    holder = torch.nn.Module()
    holder.vocabulary = Vocabulary(weight)
    holder.vocabulary.BLOCK_ROWS = 32  # three blocks, the last one short
    holder.float().to("cpu")
    assert holder.vocabulary.weight.dtype == torch.bfloat16
    x = torch.randn(3, 16, generator=generator)
    reference = x @ weight.float().t()
    for invariant in (False, True):
        assert torch.allclose(holder.vocabulary.logits(x, invariant=invariant), reference, atol=1e-5)
        ids = torch.tensor([69, 3, 40])
        assert torch.allclose(holder.vocabulary.logits(x, ids, invariant=invariant), reference[:, ids], atol=1e-5)
