"""The prefix-affinity routing policy without Ray: prefix matching, load balance, withdrawals, merged calls."""

from __future__ import annotations

from rmserve.model.items import Message, PairItem
from rmserve.serve.rayserve.affinity import (
    BLOCK_CHARS,
    AffinityPolicy,
    PrefixTable,
    call_requests,
    item_text,
    prefix_clusters,
)

PROMPT_A = "Solve: " + "a" * 1000
PROMPT_B = "Solve: " + "b" * 1000


def sample(prompt: str, k: int) -> str:
    return item_text({"prompt": prompt, "response": f"sample {k} " * 20})


def test_item_text_reads_every_item_form_and_model_alike():
    pair = {"prompt": [{"role": "user", "content": "hi"}], "response": "yo"}
    assert item_text(pair) == item_text(PairItem(prompt=[Message(role="user", content="hi")], response="yo"))
    assert item_text(pair).startswith("<user>hi")
    assert item_text({"text": "abc"}) == "abc"
    assert item_text({"input_ids": [1, 2, 3]}) == "1,2,3"
    assert item_text({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    assert item_text(7) == ""


def test_call_requests_reads_the_scorer_methods_arguments():
    items = [{"text": "x"}]
    assert call_requests("score", [items]) == [(items, None)]
    assert call_requests("score_requests_streamed", [[(items, False, "id1"), (items, True, "id2")]]) == [
        (items, "id1"),
        (items, "id2"),
    ]
    assert call_requests("info", []) == []


def test_the_table_finds_the_longest_held_prefix_among_the_candidates():
    table = PrefixTable()
    table.insert(table.keys(PROMPT_A + " first answer"), "r1")
    owner, blocks = table.match(table.keys(PROMPT_A + " another answer"), ["r1", "r2"])
    assert owner == "r1" and blocks == len(PROMPT_A) // BLOCK_CHARS
    assert table.match(table.keys(PROMPT_A), ["r2"]) == (None, 0)  # r1 is not a candidate (e.g. it died)
    assert table.match(table.keys(PROMPT_B), ["r1", "r2"]) == (None, 0)


def test_the_table_forgets_the_oldest_blocks_first_and_a_dead_replicas():
    table = PrefixTable(max_blocks=20)
    table.insert(table.keys(PROMPT_A), "r1")  # 15 blocks
    table.insert(table.keys(PROMPT_B), "r2")  # 15 more: A's last blocks go, its first ones stay
    assert len(table) == 20
    assert table.match(table.keys(PROMPT_A), ["r1"])[0] == "r1"
    table.forget("r2")
    assert table.match(table.keys(PROMPT_B), ["r2"]) == (None, 0)


def test_samples_of_one_prompt_go_to_one_replica_and_new_prompts_balance():
    policy = AffinityPolicy(imbalance_items=100)
    replicas = ["r1", "r2"]
    first = policy.choose(replicas, [sample(PROMPT_A, 0)], items=1, call="a0")
    other = policy.choose(replicas, [sample(PROMPT_B, 0)], items=1, call="b0")
    assert other != first  # a new prompt goes to the least-loaded replica
    for k in range(1, 8):
        assert policy.choose(replicas, [sample(PROMPT_A, k)], items=1, call=f"a{k}") == first
        assert policy.choose(replicas, [sample(PROMPT_B, k)], items=1, call=f"b{k}") == other
    assert policy.load == {first: 8, other: 8}
    assert (policy.affine, policy.balanced) == (14, 2)
    for k in range(8):
        policy.finished(f"a{k}")
    assert policy.load == {first: 0, other: 8}


def test_affinity_yields_to_the_least_loaded_replica_past_the_imbalance():
    policy = AffinityPolicy(imbalance_items=10)
    home = policy.choose(["r1", "r2"], [sample(PROMPT_A, 0)], items=10, call="c0")
    assert policy.choose(["r1", "r2"], [sample(PROMPT_A, 1)], items=1, call="c1") == home  # 10 ahead: still home
    away = policy.choose(["r1", "r2"], [sample(PROMPT_A, 2)], items=1, call="c2")  # 11 ahead: balance wins
    assert away != home


def test_a_shared_template_header_alone_does_not_tie_prompts():
    header = "<system>You are a helpful assistant." + " " * 100  # 2 blocks of 2,000-character items
    policy = AffinityPolicy()
    first = policy.choose(["r1", "r2"], [item_text({"text": header + "x" * 2000})], items=1, call="c0")
    assert policy.choose(["r1", "r2"], [item_text({"text": header + "y" * 2000})], items=1, call="c1") != first


def test_routers_break_ties_alike():
    # Two Gateways, each with its own policy, send a new prompt to the same idle replica.
    text = sample(PROMPT_A, 0)
    assert AffinityPolicy().choose(["r1", "r2"], [text], 1, "x") == AffinityPolicy().choose(
        ["r2", "r1"], [text], 1, "y"
    )


def test_withdrawals_find_the_replica_holding_the_requests_while_their_call_runs():
    policy = AffinityPolicy()
    replica = policy.choose(["r1", "r2"], [sample(PROMPT_A, 0)], items=2, call="c0", request_ids=["q1", "q2"])
    assert policy.holder(["q2"], ["r1", "r2"]) == replica
    assert policy.holder(["q2"], ["r3"]) is None  # its replica is gone
    policy.finished("c0")
    assert policy.holder(["q1"], ["r1", "r2"]) is None


def test_a_call_routed_again_counts_once():
    policy = AffinityPolicy()
    policy.choose(["r1", "r2"], [sample(PROMPT_A, 0)], items=5, call="c0")
    policy.choose(["r1", "r2"], [sample(PROMPT_A, 0)], items=5, call="c0")  # its replica refused it: routed again
    assert sum(policy.load.values()) == 5


def test_a_call_is_routed_again_only_after_it_was_routed_once():
    policy = AffinityPolicy()
    assert not policy.routed_before("c0")
    policy.choose(["r1", "r2"], [sample(PROMPT_A, 0)], items=1, call="c0")
    assert policy.routed_before("c0")  # Serve routes it again: the router offers the other replicas too
    policy.finished("c0")
    assert not policy.routed_before("c0")


def test_prefix_clusters_join_texts_that_share_a_long_prefix():
    texts = [sample(PROMPT_A, 0), "short", sample(PROMPT_B, 1), sample(PROMPT_A, 2), "shorter"]
    assert sorted(prefix_clusters(texts)) == [[0, 3], [1], [2], [4]]


def test_every_request_of_a_merged_call_is_remembered_where_the_call_went():
    policy = AffinityPolicy()
    replica = policy.choose(["r1", "r2"], [sample(PROMPT_A, 0), sample(PROMPT_B, 0)], items=2, call="c0")
    policy.finished("c0")
    assert policy.choose(["r1", "r2"], [sample(PROMPT_B, 1)], items=1, call="c1") == replica
