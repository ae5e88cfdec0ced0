"""Verdict-token scoring of a causal-LM judge (issue 19 item 3, settings form): the reward is the probability of the
first verdict token at the end of the judge's input, softmax over just the verdict tokens or over the whole
vocabulary; equal to softmax over transformers' logits at the last position (fp32, 1e-5), both padding sides, prefix
sharing on and off, bitwise batch-independent in batch-invariant mode."""

from __future__ import annotations

import pytest
import torch
from checkpoints import _config, build_tokenizer, unshared_rewards

from rmserve.model import load_reward_model

TOL = 1e-5
JUDGE = (
    "<|user|>Is this answer correct? Question: what is 2 + 3? Answer: {answer}. Reply A (yes) or B (no).</s>"
    "<|assistant|>"
)
ANSWERS = ["5", "6", "five", "It is 5, since 2 + 3 = 5", "23"]


@pytest.fixture(scope="module")
def judge_checkpoint(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("judge")
    tok = build_tokenizer("chat")
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(_config("llama", len(tok), tok)).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.15)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))

    def last_logits(ids) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([list(ids)])).logits[0, -1].float()

    return out, last_logits, tok


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
    together = rm.score(items)
    alone = [unshared_rewards(rm.engine, [rm.tokenize(item).input_ids])[0] for item in items]
    assert together == alone
