"""Prefix-aware scoring gives every item the reward it gets alone, computes shared prefixes once, and keeps
its caches within their budgets."""

from __future__ import annotations

import random

import pytest
import torch
from checkpoints import WINDOWED_ARCHS, unshared_rewards

from rmserve.model import load_reward_model
from rmserve.model.caches import PrefixKVCache, RecentForwards, RewardCache, SeenPrefixes
from rmserve.model.engine import IDLE_ITEMS
from rmserve.model.errors import InternalError
from rmserve.model.planning import levels_cost, plan_levels

FP32_TOL = 1e-5
BF16_TOL = 0.05  # shared vs unshared in bf16 on the demo's ±8 reward scale (measured max 0.016)


def grpo_batch(rng: random.Random, vocab: int, *, system: int = 12, groups=(1, 2, 8, 16)) -> list[list[int]]:
    """Groups of n ∈ ``groups`` sharing a user prompt, all under one system prompt (nested prefixes), plus
    items that share nothing, exact duplicates and an item that is a strict prefix of another; shuffled."""

    def rand(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    head = rand(system)
    seqs = []
    for n in groups:
        prompt = head + rand(rng.randint(4, 30))
        seqs += [prompt + rand(rng.randint(1, 12)) for _ in range(n)]
    seqs += [rand(rng.randint(2, 40)) for _ in range(4)]
    seqs += [list(seqs[1]), list(seqs[5])]
    seqs.append(seqs[8][: len(seqs[8]) - 2])
    rng.shuffle(seqs)
    return seqs


def sharing(engine, *, cache_bytes: int = 0, reward_items: int = 0, overhead: float = 0.0):
    engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=cache_bytes, reward_cache_items=reward_items)
    engine.overhead_tokens = overhead  # share every common prefix, however short


@pytest.mark.parametrize("head_format", ["score", "reward_head", "v_head_file", "value_head"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_shared_rewards_equal_reference_for_every_head_and_padding_side(
    checkpoint_factory, head_format, padding_side, device
):
    from checkpoints import reference_reward

    path, ref, tok = checkpoint_factory(head_format)
    rm = load_reward_model(str(path), dtype="fp32", device=device, padding_side=padding_side)
    sharing(rm.engine, cache_bytes=1 << 26)
    rng = random.Random(hash((head_format, padding_side)) % 1000)
    for _ in range(2):  # the second batch also reads what the first left in the cache
        seqs = grpo_batch(rng, len(tok))
        got = rm.engine.score_batch(seqs)
        want = [reference_reward(ref, s) for s in seqs]
        assert got == pytest.approx(want, abs=FP32_TOL)
    stats = rm.engine.stats
    assert stats.prefix_hits > 0 and stats.tokens_saved > 0


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_shared_rewards_on_other_architectures(checkpoint_factory, arch, device):
    from checkpoints import reference_reward

    path, ref, tok = checkpoint_factory("score", arch=arch)
    rm = load_reward_model(str(path), dtype="fp32", device=device)
    sharing(rm.engine, cache_bytes=1 << 26)
    seqs = grpo_batch(random.Random(7), len(tok))
    assert rm.engine.score_batch(seqs) == pytest.approx([reference_reward(ref, s) for s in seqs], abs=FP32_TOL)


@pytest.mark.parametrize("arch", WINDOWED_ARCHS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_sliding_window_models_see_the_window_by_position(checkpoint_factory, arch, padding_side, device):
    """Rows that read cached prompts of different lengths, or whose new tokens are padded on the left, have padding
    columns between their cached and new tokens; a sliding window (8 tokens here) still covers the same tokens as
    for the item alone. Fails when the window is measured in columns (rewards off by up to 0.4)."""
    from checkpoints import reference_reward

    path, ref, tok = checkpoint_factory("score", arch=arch)
    rm = load_reward_model(str(path), dtype="fp32", device=device, padding_side=padding_side)
    sharing(rm.engine, cache_bytes=1 << 26)
    rng = random.Random(11)
    for _ in range(2):  # the second batch reads prompts of several lengths from the cache
        seqs = grpo_batch(rng, len(tok))
        assert rm.engine.score_batch(seqs) == pytest.approx([reference_reward(ref, s) for s in seqs], abs=FP32_TOL)
    assert rm.engine.stats.prefix_hits > 0


def test_rows_that_continue_cached_prompts_read_each_prompt_once(checkpoint_factory, monkeypatch):
    """Cascade attention on the CPU (``model/cascade.py``): forwards whose rows continue cached prompts keep each
    prompt's states once and merge two attentions; a user prompt stored in such a forward (it continues a cached
    system prompt) is stored right too. Rewards: transformers' own, grouped-query attention included."""
    from checkpoints import reference_reward

    from rmserve.model.cascade import SharedPrefixes

    path, ref, tok = checkpoint_factory("score")  # 4 heads over 2 key/value heads
    rm = load_reward_model(str(path), dtype="fp32", device="cpu")
    sharing(rm.engine, cache_bytes=1 << 26)
    built = []
    build = SharedPrefixes.build

    def counting(pasts, device):
        built.append(sum(1 for past in pasts if past))
        return build(pasts, device)

    monkeypatch.setattr(SharedPrefixes, "build", counting)
    rng = random.Random(3)
    rand = lambda n: [rng.randrange(3, len(tok)) for _ in range(n)]  # noqa: E731
    system = rand(60)
    rm.engine.score_batch([system + rand(3)])  # the system prompt is cached from here on
    prompts = [system + rand(rng.randint(4, 8)) for _ in range(3)]
    for _ in range(2):  # the second round continues the user prompts the first stored
        seqs = [p + rand(rng.randint(1, 10)) for p in prompts for _ in range(4)]
        rng.shuffle(seqs)
        assert rm.engine.score_batch(seqs) == pytest.approx([reference_reward(ref, s) for s in seqs], abs=FP32_TOL)
    assert built and max(built) > 1


def test_random_batches_with_left_truncated_items_match_unshared(demo_model):
    """Left truncation cuts the prompt's start, so truncated group members may share nothing or a shifted
    prefix; whatever is shared, rewards stay those of the unshared forward."""
    engine = demo_model.engine
    prompt = "Tell me about owls. " * 30
    items = [{"prompt": prompt, "response": f"Owls are lovely {'and wise ' * k}birds."} for k in range(8)]
    items += [{"prompt": "Tea?", "response": "Of course. Tea is lovely."}] * 2
    formatter = demo_model.formatter
    saved = formatter.max_length
    formatter.max_length = 96
    try:
        tokenized = [demo_model.tokenize(it, i) for i, it in enumerate(items)]
    finally:
        formatter.max_length = saved
    assert sum(t.truncated for t in tokenized) >= 6
    seqs = [list(t.input_ids) for t in tokenized]
    want = unshared_rewards(engine, seqs)
    saved_overhead = engine.overhead_tokens
    try:
        for padding_side in ("right", "left"):
            engine.padding_side = padding_side
            sharing(engine, cache_bytes=1 << 24)
            assert engine.score_batch(seqs) == pytest.approx(want, abs=FP32_TOL)
    finally:
        engine.padding_side = "right"
        engine.overhead_tokens = saved_overhead
        engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=1 << 30, reward_cache_items=65536)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_a_group_split_across_batches_computes_its_prompt_once(demo_model, padding_side):
    engine = demo_model.engine
    rng = random.Random(11)
    prompt = [rng.randrange(3, 300) for _ in range(60)]
    # each response starts with its own token, so each sample shares exactly the prompt with the others
    members = [prompt + [3 + k] + [rng.randrange(3, 300) for _ in range(rng.randint(2, 8))] for k in range(8)]
    want = unshared_rewards(engine, members)
    saved = engine.overhead_tokens
    try:
        engine.padding_side = padding_side
        sharing(engine, cache_bytes=1 << 24)
        before = engine.stats.real_tokens
        got = [engine.score_batch([m])[0] for m in members]  # one sample per batch, as per-sample requests arrive
        computed = engine.stats.real_tokens - before
        tree_bytes = engine.prefix_cache.bytes
    finally:
        engine.padding_side = "right"
        engine.overhead_tokens = saved
        engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=1 << 30, reward_cache_items=65536)
    assert got == pytest.approx(want, abs=FP32_TOL)
    # The first sample keeps nothing in the prefix cache, but its forward stays held: the second copies the prompt
    # out of it, and every sample after the first computes only its response.
    assert computed == len(members[0]) + sum(len(m) - len(prompt) for m in members[1:])
    assert tree_bytes > 0


def test_a_group_after_a_cached_system_prompt_computes_its_prompt_once(demo_model):
    """Every item starts with the same system prompt (a chat template's), which the prefix cache holds: a group's
    first sample then runs on those cached states, and its forward is still held for the second sample."""
    engine = demo_model.engine
    rng = random.Random(13)
    system = [rng.randrange(3, 300) for _ in range(32)]
    others = [system + [rng.randrange(3, 300) for _ in range(40)] for _ in range(2)]
    prompt = system + [rng.randrange(3, 300) for _ in range(64)]
    members = [prompt + [3 + k] + [rng.randrange(3, 300) for _ in range(5)] for k in range(3)]
    want = unshared_rewards(engine, members)
    saved = engine.overhead_tokens
    try:
        sharing(engine, cache_bytes=1 << 24)
        for item in others:  # the second keeps the system prompt in the cache
            engine.score_batch([item])
        assert engine.prefix_cache.known(members[0], len(members[0])) == len(system)
        before = engine.stats.real_tokens
        got = [engine.score_batch([m])[0] for m in members]
        computed = engine.stats.real_tokens - before
    finally:
        engine.overhead_tokens = saved
        engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=1 << 30, reward_cache_items=65536)
    assert got == pytest.approx(want, abs=FP32_TOL)
    assert computed == len(members[0]) - len(system) + sum(len(m) - len(prompt) for m in members[1:])


def test_a_prompt_whose_forward_was_let_go_is_computed_again(demo_model):
    engine = demo_model.engine
    rng = random.Random(12)
    prompt = [rng.randrange(3, 300) for _ in range(48)]
    first, second = (prompt + [3 + k, rng.randrange(3, 300)] for k in range(2))
    want = unshared_rewards(engine, [first, second])
    try:
        sharing(engine, cache_bytes=1 << 24)
        engine.score_batch([first])
        engine.recent.clear()  # the forward is let go (the held share of the budget is full of later forwards)
        before = engine.stats.real_tokens
        got = engine.score_batch([second])
        computed = engine.stats.real_tokens - before
        third = engine.score_batch([prompt + [9, 9]])  # the second sample kept the prompt's whole blocks
    finally:
        engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=1 << 30, reward_cache_items=65536)
    assert got == pytest.approx(want[1:], abs=FP32_TOL)
    assert computed == len(second)
    assert third == pytest.approx(unshared_rewards(engine, [prompt + [9, 9]]), abs=FP32_TOL)


def test_items_that_share_nothing_keep_no_states(demo_model):
    engine = demo_model.engine
    rng = random.Random(5)
    items = [[rng.randrange(3, 300) for _ in range(rng.randint(40, 90))] for _ in range(12)]
    try:
        sharing(engine, cache_bytes=1 << 24)
        for k in range(0, len(items), 3):  # PPO-like traffic: every item its own prompt, in several batches
            engine.score_batch(items[k : k + 3])
        assert engine.prefix_cache.bytes == 0  # nothing copied into the cache
        engine.score_batch([items[0][:50] + [7, 8, 9]])  # shares 50 tokens with an earlier item: those are kept
        assert engine.prefix_cache.known(items[0], len(items[0])) == 50  # copied out of the held forward
    finally:
        engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=1 << 30, reward_cache_items=65536)


def test_held_forwards_count_the_memory_they_keep_alive_and_let_the_oldest_go():
    recent = RecentForwards(max_bytes=10_000)
    fused = torch.zeros(1, 2, 30, 12)  # a fused projection's output, 2,880 bytes: keys and values are slices of it
    keys, values = fused[..., :4], fused[..., 8:]
    first = recent.hold([(keys, values)], cached_width=0)
    assert recent.bytes == fused.untyped_storage().nbytes() == 2880  # not 2 x 960 for the two views
    second = recent.hold([(torch.zeros(1, 2, 30, 4), torch.zeros(1, 2, 30, 4))], cached_width=0)  # 1,920 bytes
    assert recent.bytes == 4800 and first.layers is not None
    recent.hold([(torch.zeros(1, 2, 80, 8), torch.zeros(1, 2, 10, 4))], cached_width=0)  # 5,120 + 320 bytes
    assert first.layers is None and second.layers is not None  # the oldest let go to stay within the budget
    assert recent.bytes == 1920 + 5440
    assert recent.hold([(torch.zeros(1, 2, 400, 4), torch.zeros(1, 2, 1, 4))], cached_width=0) is None  # too big


def test_seen_prefixes_count_whole_shared_blocks_and_forget_the_oldest():
    seen = SeenPrefixes(max_blocks=4)
    a = list(range(40))
    seen.add(a)  # blocks [0, 16) and [0, 32)
    assert seen.shared(a[:35] + [99]) == 32
    assert seen.shared([1, *a[1:]]) == 0
    assert seen.shared(a[:20]) == 16
    seen.add([500 + i for i in range(48)])  # three more blocks: the oldest of a's is forgotten first
    assert len(seen) == 4
    assert seen.shared(a) == 16


def test_cost_estimate_equals_tokens_computed(demo_model):
    engine = demo_model.engine
    seqs = grpo_batch(random.Random(5), 300)
    saved = engine.overhead_tokens
    try:
        sharing(engine, overhead=0.0)
        estimate = engine.batch_cost(seqs)
        before = engine.stats.padded_tokens
        engine.score_batch(seqs)
        assert estimate == engine.stats.padded_tokens - before
        assert estimate < sum(len(s) for s in seqs) * 0.6  # the shared prompts are most of the batch
    finally:
        engine.overhead_tokens = saved
        engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=1 << 30, reward_cache_items=65536)


def test_nested_prefixes_run_in_levels_and_short_ones_are_not_shared():
    system, a, b = [1] * 20, [2] * 30, [3] * 30
    seqs = [system + a + [9], system + a + [8], system + b + [7], system + b + [6], [5, 5, 5]]
    levels = plan_levels(seqs, known=lambda ids, limit: 0, min_shared_tokens=10)
    assert [[(r.start, r.end, r.item) for r in level if r.item is None] for level in levels[:2]] == [
        [(0, 20, None)],
        [(20, 50, None), (20, 50, None)],
    ]
    assert sorted(r.item for level in levels for r in level if r.item is not None) == list(range(5))
    # Saving (2 - 1) x 20 tokens of a 20-token system prompt is below an overhead of 25: not worth a level.
    flat = plan_levels([system + [1], system + [2]], known=lambda ids, limit: 0, min_shared_tokens=25)
    assert len(flat) == 1 and all(r.item is not None and r.start == 0 for r in flat[0])
    assert levels_cost(flat, 1000, 25) == 2 * 21 + 25


def test_prefix_cache_stays_within_its_budget_under_distinct_prefixes(demo_model):
    engine = demo_model.engine
    rng = random.Random(2)
    budget = 200_000
    batches = []
    for _ in range(30):
        prompt = [rng.randrange(3, 300) for _ in range(40)]
        batches.append([prompt + [rng.randrange(3, 300) for _ in range(5)] for _ in range(4)])
    wants = [unshared_rewards(engine, seqs) for seqs in batches]
    saved = engine.overhead_tokens
    try:
        sharing(engine, cache_bytes=budget)
        for seqs, want in zip(batches, wants, strict=True):
            assert engine.score_batch(seqs) == pytest.approx(want, abs=FP32_TOL)
            assert engine.prefix_cache.bytes <= budget
        assert engine.prefix_cache.evicted_bytes > 0
    finally:
        engine.overhead_tokens = saved
        engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=1 << 30, reward_cache_items=65536)


def test_reward_cache_answers_duplicates_without_a_forward_and_stays_bounded(demo_model):
    engine = demo_model.engine
    rng = random.Random(4)
    seqs = [[rng.randrange(3, 300) for _ in range(rng.randint(5, 30))] for _ in range(12)]
    engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=0, reward_cache_items=8)
    try:
        first = engine.score_batch(seqs[:8])
        forwards = engine.stats.microbatches
        again = engine.score_batch(seqs[:8] + seqs[:8])
        assert engine.stats.microbatches == forwards  # all 16 answered from the cache
        assert again == first + first
        engine.score_batch(seqs[8:])
        assert len(engine.reward_cache) == 8
    finally:
        engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=1 << 30, reward_cache_items=65536)


def test_radix_cache_matches_splits_and_evicts_least_recently_used():
    def kv(n: int, fill: float) -> torch.Tensor:
        return torch.full((2, 2, 1, n, 4), fill)

    cache = PrefixKVCache(max_bytes=10**9)
    cache.insert([1, 2, 3, 4], 0, kv(4, 1.0))
    cache.insert([1, 2, 9], 2, kv(1, 2.0))  # [1, 2] known: the node splits after two tokens
    known, segments = cache.match([1, 2, 9, 7])
    assert known == 3 and torch.cat(segments, dim=3)[0, 0, 0, :, 0].tolist() == [1.0, 1.0, 2.0]
    assert cache.match([1, 2, 3, 4, 5], limit=3)[0] == 3 and cache.known([5, 1]) == 0
    cache.match([1, 2, 3])  # [3, 4] used more recently than [9]
    per_token = kv(1, 0).numel() * 4
    cache.max_bytes = cache.bytes - per_token  # one token too many: the [9] leaf goes first
    cache.evict_to_budget()
    assert cache.known([1, 2, 9]) == 2 and cache.known([1, 2, 3, 4]) == 4


def test_reward_cache_is_lru():
    cache = RewardCache(2)
    cache.put(b"a", 1.0)
    cache.put(b"b", 2.0)
    assert cache.get(b"a") == 1.0
    cache.put(b"c", 3.0)
    assert cache.get(b"b") is None and cache.get(b"a") == 1.0 and len(cache) == 2


@pytest.mark.parametrize("dtype", ["bf16"])
def test_bf16_shared_rewards_stay_within_the_stated_tolerance(demo_model_dir, dtype, device):
    rm = load_reward_model(str(demo_model_dir), dtype=dtype, device=device)
    seqs = grpo_batch(random.Random(9), 300)
    want = unshared_rewards(rm.engine, seqs)
    sharing(rm.engine, cache_bytes=1 << 24)
    got = rm.engine.score_batch(seqs)
    print(f"{dtype} shared vs unshared: max |Δ| = {max(abs(a - b) for a, b in zip(got, want, strict=True)):.4f}")
    assert got == pytest.approx(want, abs=BF16_TOL)


def test_int8_preference_agreement_is_unchanged_by_sharing(demo_model_dir, device):
    from rmserve.model.demo import heldout_pairs

    pairs = heldout_pairs(100)
    rm = load_reward_model(str(demo_model_dir), quantization="int8", dtype="fp32", device=device)
    chosen = [rm.tokenize({"prompt": p["prompt"], "response": p["chosen"]}).input_ids for p in pairs]
    rejected = [rm.tokenize({"prompt": p["prompt"], "response": p["rejected"]}).input_ids for p in pairs]
    seqs = [list(s) for pair in zip(chosen, rejected, strict=True) for s in pair]
    base = unshared_rewards(rm.engine, seqs)
    sharing(rm.engine)
    shared = rm.engine.score_batch(seqs)
    prefer = [a > b for a, b in zip(base[::2], base[1::2], strict=True)]
    prefer_shared = [a > b for a, b in zip(shared[::2], shared[1::2], strict=True)]
    agreement = sum(a == b for a, b in zip(prefer, prefer_shared, strict=True)) / len(prefer)
    print(f"int8 shared vs unshared preference agreement = {agreement:.3f}")
    assert agreement >= 0.98


def test_a_nan_item_never_poisons_the_prefixes_other_items_share(demo_model):
    """A NaN anywhere in a row spreads over the whole row (masked attention weights are 0, and 0 x NaN is NaN), so
    a poisoned item's states must never be cached for the clean prefix it shares with others."""
    engine = demo_model.engine
    rng = random.Random(13)
    prompt = [rng.randrange(10, 300) for _ in range(30)]
    poison = 3  # the lowest id here: the poisoned row sorts before the clean ones
    clean = [prompt + [rng.randrange(10, 290) for _ in range(6)] for _ in range(3)]
    poisoned = prompt + [poison] + [rng.randrange(10, 290) for _ in range(5)]
    want = unshared_rewards(engine, clean)
    embeddings = engine.backbone.get_input_embeddings().weight
    saved_row, saved_overhead = embeddings[poison].detach().clone(), engine.overhead_tokens
    try:
        with torch.no_grad():
            embeddings[poison] = float("nan")
        sharing(engine, cache_bytes=1 << 24)
        engine.overhead_tokens = 1e9  # no shared level: the poisoned row and a clean one side by side in one forward
        first = engine.score_batch([poisoned, clean[0]])  # the poisoned row sorts first: its neighbour keeps its own
        later = engine.score_batch(clean[1:])  # these match the cached rows' first 30 tokens
    finally:
        with torch.no_grad():
            embeddings[poison] = saved_row
        engine.overhead_tokens = saved_overhead
        engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=1 << 30, reward_cache_items=65536)
    assert isinstance(first[0], InternalError)
    assert [first[1], *later] == pytest.approx(want, abs=FP32_TOL)


def test_traffic_that_shares_nothing_stops_holding_forwards_until_an_item_shares_again(demo_model):
    """After ``IDLE_ITEMS`` items that shared nothing (PPO), forwards are not held (their memory goes back); a group's
    first sample then is not held either, its second is computed whole but keeps the prompt, and the third reads it:
    rewards unchanged, and holding is back."""
    engine = demo_model.engine
    rng = random.Random(21)
    items = [[rng.randrange(3, 300) for _ in range(rng.randint(20, 40))] for _ in range(IDLE_ITEMS + 8)]
    prompt = [rng.randrange(3, 300) for _ in range(48)]
    group = [prompt + [3 + k, rng.randrange(3, 300)] for k in range(3)]
    want = unshared_rewards(engine, group)
    try:
        sharing(engine, cache_bytes=1 << 24)
        for k in range(0, len(items), 4):
            engine.score_batch(items[k : k + 4])
        assert engine.recent.bytes == 0
        before = engine.stats.real_tokens
        got = [engine.score_batch([member])[0] for member in group]
        computed = engine.stats.real_tokens - before
        assert engine.recent.bytes > 0
    finally:
        engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=1 << 30, reward_cache_items=65536)
    assert got == pytest.approx(want, abs=FP32_TOL)
    assert computed == len(group[0]) + len(group[1]) + len(group[2]) - len(prompt)


def test_a_grpo_step_with_more_groups_than_idle_items_holds_its_first_samples_the_next_step(demo_model):
    """A GRPO step whose first samples (one per group, ``IDLE_ITEMS`` + 36 groups) all come before the second ones
    outruns the limit: the groups past it compute their prompt twice. The limit then becomes twice that run, so the
    next such step computes each prompt once (held with its first sample, stored when the second shows the
    boundary); rewards as unshared."""
    engine = demo_model.engine
    rng = random.Random(29)
    groups = IDLE_ITEMS + 36

    def step() -> tuple[int, list, list]:
        prompts = [[rng.randrange(3, 300) for _ in range(rng.randint(30, 40))] for _ in range(groups)]
        pairs = [[p + [rng.randrange(3, 300) for _ in range(rng.randint(4, 9))] for _ in range(2)] for p in prompts]
        order = [pair[k] for k in range(2) for pair in pairs]  # every first sample, then every second one
        before, got = engine.stats.real_tokens, []
        for k in range(0, len(order), 4):
            got += engine.score_batch(order[k : k + 4])
        return engine.stats.real_tokens - before, order, got

    try:
        sharing(engine, cache_bytes=1 << 26)
        first_computed, first_order, _ = step()
        learnt = engine.idle_items
        computed, order, got = step()
    finally:
        engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=1 << 30, reward_cache_items=65536)
    whole = sum(len(seq) for seq in order[:groups])  # the first samples, computed whole
    suffixes = sum(len(b) - _common(a, b) for a, b in zip(order[:groups], order[groups:], strict=True))
    assert learnt >= 2 * groups > IDLE_ITEMS
    assert computed == whole + suffixes < first_computed, (computed, whole + suffixes, first_computed)
    assert got == pytest.approx(unshared_rewards(engine, order), abs=FP32_TOL)


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_items_that_share_only_a_template_start_are_computed_whole_and_not_held(demo_model):
    """Every item of PPO traffic starts with the chat template's first tokens: a stretch that short (under
    ``MIN_REUSED_TOKENS``) gets no level and no row reads it from the cache (the causal kernel, nothing copied), so
    after ``IDLE_ITEMS`` items forwards are not held either; rewards as unshared."""
    engine = demo_model.engine
    rng = random.Random(23)
    template = [1, 5, 7]
    items = [template + [rng.randrange(8, 300) for _ in range(rng.randint(20, 40))] for _ in range(IDLE_ITEMS + 8)]
    want = unshared_rewards(engine, items)
    got = []
    try:
        sharing(engine, cache_bytes=1 << 24)  # overhead 0: a level for any prefix that saves a token
        for k in range(0, len(items), 8):
            plan = engine.plan(items[k : k + 8])
            rows = [r for level in plan.microbatches for chunk in level for r in chunk]
            assert len(plan.microbatches) == 1 and all(r.item is not None and r.start == 0 for r in rows)
            got += engine.run(plan)
        assert engine.recent.bytes == 0 and engine.prefix_cache.bytes == 0
    finally:
        engine.configure_sharing(prefix_sharing=True, prefix_cache_bytes=1 << 30, reward_cache_items=65536)
    assert got == pytest.approx(want, abs=FP32_TOL)
