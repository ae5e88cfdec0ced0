"""Issue 11: the trainers' own HTTP clients, replayed against a real Ray Serve app, work unmodified.

The request bodies and retry policies below are re-implemented from the trainers' current code (read, not copied):

* OpenRLHF, ``openrlhf/utils/agent.py`` at commit 3c3be6234e0c (``SingleTurnAgentExecutor``):
  ``_fetch_rewards_via_http`` splits one call's queries over the ``--reward.remote_url`` URLs in shards of
  ``ceil(n / urls)`` (line 325) and posts ``{"query", "prompts", "labels"}`` to each; ``_post_request`` tries five
  times (line 338), treats any exception, a non-2xx status included (``raise_for_status``, line 343), as a failure
  and sleeps one second between tries (line 349), ignoring ``Retry-After``; after five the reward is lost.
* verl, ``verl/experimental/reward_loop/reward_loop.py`` at commit b178a3cd56f5: ``compute_score_disrm`` posts
  ``{"model": reward_model.model.path, "input": text, "activation": False}`` to ``/classify`` (lines 203-212) and
  reads ``data[-1].probs[-1]`` (line 213); ``_post_request`` tries 16 times (line 124), gives up at once on any
  4xx, 429 included (line 137), and retries 5xx and connection errors after ``min(2 ** attempt, 30)`` s (line 157).
  With ``reward_model.rollout.name: sglang`` the same function posts ``{"model", "input"}`` to ``/v1/embeddings``
  (lines 214-219) and reads ``data[-1].embedding[-1]`` (line 220).
* slime, ``slime/rollout/rm_hub/__init__.py`` at commit 624b824a898a: ``remote_rm`` posts one sample's
  ``{"prompt", "response", "label"}`` to ``--rm-url``, treats any exception, a non-2xx status included, as a failure,
  and tries ten times with ``min(2 ** attempt, 30) + random()`` s between tries; the answer's ``[--reward-key]`` is the
  reward.

All send one request per sample, all at once: a burst of 3 x ``max_queued_items`` single-sample requests must
give every sample its reward (the compatibility routes wait for room in the queue instead of answering 429).
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass

import httpx
import pytest
from serve_harness import LiveApp, async_client, demo_config, running_app

from rmserve.model.synthetic import make_preference_pairs

pytestmark = pytest.mark.ray

TOL = 1e-5  # fp32 on CPU
QUEUE = 8  # limits.max_queued_items: small, so a burst of 3 x QUEUE overflows it
HOLD_S = 1.0  # fault plan: a burst request stays queued this long after admission, so the burst must overflow
SERVED_NAME = "Skywork/Skywork-Reward-Llama-3.1-8B"  # what a verl config may name instead of the local path


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    path, _, tokenizer = checkpoint_factory("score", "llama", "pad")
    return path, tokenizer


@pytest.fixture(scope="module")
def app(checkpoint):
    config = demo_config(
        checkpoint[0],
        served_model_names=[SERVED_NAME],
        limits={"max_queued_items": QUEUE, "max_items_per_request": QUEUE, "request_timeout_s": 120},
        testing={"fault_injection": True},
        batching={"batch_wait_timeout_s": 0.01},
    )
    with running_app(config) as live:
        yield live


@pytest.fixture
async def client(app):
    async with async_client(app) as c:
        yield c


def texts(tokenizer, n: int, seed: int = 3) -> list[str]:
    """Chat-formatted prompt + response texts, as the trainers render them for the reward model."""
    out = []
    for pair in make_preference_pairs(n, seed=seed)[:n]:
        chat = [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": pair["chosen"]}]
        out.append(tokenizer.apply_chat_template(chat, tokenize=False))
    return out


# -- the trainers' retry policies, re-implemented ---------------------------------------------------------
@dataclass
class Outcome:
    body: dict | None  # None: the trainer gave up and the sample has no reward
    attempts: int
    statuses: list[int]


async def openrlhf_post(client: httpx.AsyncClient, url: str, payload: dict, try_max_times: int = 5) -> Outcome:
    """OpenRLHF's ``_post_request``: five tries, any failure retried after 1 s, then the reward is lost."""
    statuses = []
    for attempt in range(1, try_max_times + 1):
        try:
            response = await client.post(url, json=payload)
            statuses.append(response.status_code)
            response.raise_for_status()
            return Outcome(response.json(), attempt, statuses)
        except httpx.HTTPError:
            pass
        await asyncio.sleep(1)
    return Outcome(None, try_max_times, statuses)


async def verl_post(client: httpx.AsyncClient, url: str, payload: dict, max_retries: int = 16) -> Outcome:
    """verl's ``_post_request``: any 4xx is final; 5xx and connection errors retried after min(2**attempt, 30) s."""
    statuses = []
    for attempt in range(max_retries):
        try:
            response = await client.post(url, json=payload)
            statuses.append(response.status_code)
            if 400 <= response.status_code < 500:
                return Outcome(None, attempt + 1, statuses)
            response.raise_for_status()
            return Outcome(response.json(), attempt + 1, statuses)
        except httpx.HTTPError:
            pass
        if attempt < max_retries - 1:
            await asyncio.sleep(min(2**attempt, 30))
    return Outcome(None, max_retries, statuses)


async def slime_post(client: httpx.AsyncClient, url: str, payload: dict, max_retries: int = 10) -> Outcome:
    """slime's ``remote_rm``: any failure retried after min(2**attempt, 30) + U(0, 1) s, ten tries in all."""
    statuses = []
    for attempt in range(max_retries):
        try:
            response = await client.post(url, json=payload)
            statuses.append(response.status_code)
            response.raise_for_status()
            return Outcome(response.json(), attempt + 1, statuses)
        except httpx.HTTPError:
            if attempt + 1 >= max_retries:
                return Outcome(None, attempt + 1, statuses)
        await asyncio.sleep(min(2**attempt, 30) + random.random())
    return Outcome(None, max_retries, statuses)


async def openrlhf_rewards(client: httpx.AsyncClient, urls: list[str], queries: list[str]) -> list[Outcome]:
    """``_fetch_rewards_via_http``: the queries split over ``urls`` in shards of ceil(n / len(urls))."""
    size = (len(queries) + len(urls) - 1) // len(urls)
    shards = [queries[i * size : (i + 1) * size] for i in range(len(urls))]
    payloads = [{"query": s, "prompts": ["p"] * len(s), "labels": [""] * len(s)} for s in shards]
    return list(await asyncio.gather(*(openrlhf_post(client, u, p) for u, p in zip(urls, payloads, strict=True))))


def verl_payload(model_path: str, text: str) -> dict:
    return {"model": model_path, "input": text, "activation": False}


def samples_for(trainer: str, tokenizer, n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``n`` samples as ``trainer`` sends them, and each one's item as ``/v1/score`` takes it."""
    if trainer == "slime":
        pairs = make_preference_pairs(n, seed=seed)[:n]
        return [{"prompt": p["prompt"], "response": p["chosen"], "label": ""} for p in pairs], [
            {"prompt": p["prompt"], "response": p["chosen"]} for p in pairs
        ]
    return [{"text": t} for t in texts(tokenizer, n, seed=seed)], [{"text": t} for t in texts(tokenizer, n, seed=seed)]


async def trainer_reward(client: httpx.AsyncClient, trainer: str, model_path: str, sample: dict) -> tuple:
    """One sample through ``trainer``'s own client: (its reward or None, the outcome)."""
    if trainer == "openrlhf":
        outcome = (await openrlhf_rewards(client, ["/get_reward"], [sample["text"]]))[0]
        return (outcome.body["rewards"][0] if outcome.body else None), outcome
    if trainer == "verl":
        outcome = await verl_post(client, "/classify", verl_payload(model_path, sample["text"]))
        return (outcome.body["data"][-1]["probs"][-1] if outcome.body else None), outcome
    if trainer == "verl-sglang":
        outcome = await verl_post(client, "/v1/embeddings", {"model": model_path, "input": sample["text"]})
        return (outcome.body["data"][-1]["embedding"][-1] if outcome.body else None), outcome
    outcome = await slime_post(client, "/slime/reward", sample)
    return (outcome.body["reward"] if outcome.body else None), outcome


TRAINERS = ["openrlhf", "verl", "verl-sglang", "slime"]


# -- tests ------------------------------------------------------------------------------------------------
async def test_verl_classify_with_the_checkpoint_path_as_model(app: LiveApp, client, checkpoint, offline):
    path = str(checkpoint[0])
    samples = texts(checkpoint[1], 3)
    expected = offline.score([{"text": t} for t in samples])
    names = [path, path + "/", os.path.realpath(path), SERVED_NAME, offline.model_id]
    for name, text, reward in zip(names, samples * 2, expected * 2):
        outcome = await verl_post(client, "/classify", verl_payload(name, text))
        assert outcome.statuses == [200], (name, outcome)
        assert outcome.body["data"][-1]["probs"][-1] == pytest.approx(reward, abs=TOL)  # the raw reward
    models = (await client.get("/v1/models")).json()["data"][0]
    assert {offline.model_id, SERVED_NAME, path, os.path.realpath(path)} <= set(models["names"])
    wrong = await client.post("/classify", json=verl_payload("/not/the/model", samples[0]))
    assert wrong.status_code == 404 and wrong.json()["error"]["param"] == "model"


async def test_openrlhf_two_urls_with_one_sample_both_answer_200(app: LiveApp, client, checkpoint, offline):
    query = texts(checkpoint[1], 1)[0]
    urls = [f"{app.url}/get_reward", f"{app.url}/get_reward"]  # --reward.remote_url a,b (here: one server twice)
    first, second = await openrlhf_rewards(client, urls, [query])
    assert first.statuses == [200] and second.statuses == [200]
    assert first.body["rewards"] == pytest.approx(offline.score([{"text": query}]), abs=TOL)
    assert second.body == {"rewards": [], "scores": [], "extra_logs": {}}  # the empty shard
    empty = await client.post("/classify", json={"input": []})
    assert empty.status_code == 200 and empty.json()["data"] == []


@pytest.mark.parametrize("trainer", TRAINERS)
async def test_64_concurrent_samples_each_get_the_reward_v1_score_gives(app: LiveApp, client, checkpoint, trainer):
    samples, items = samples_for(trainer, checkpoint[1], 64, seed=29)
    results = await asyncio.gather(*(trainer_reward(client, trainer, str(checkpoint[0]), s) for s in samples))
    chunks = [items[i : i + QUEUE] for i in range(0, len(items), QUEUE)]  # max_items_per_request is QUEUE here
    native = [r for chunk in chunks for r in (await client.post("/v1/score", json={"items": chunk})).json()["rewards"]]
    assert [reward for reward, _ in results] == pytest.approx(native, abs=TOL)
    assert all(outcome.statuses == [200] for _, outcome in results)


@pytest.mark.parametrize("trainer", TRAINERS)
async def test_a_burst_of_three_queues_of_single_samples_gets_every_reward(app: LiveApp, checkpoint, offline, trainer):
    seed = {"openrlhf": 19, "verl": 17, "verl-sglang": 13, "slime": 11}[trainer]
    samples, items = samples_for(trainer, checkpoint[1], 3 * QUEUE, seed=seed)
    expected = offline.score(items)
    lengths = {len(offline.tokenize(item)) for item in items}
    scorer = app.scorer()
    await scorer.set_faults.remote(delays=dict.fromkeys(lengths, HOLD_S))  # admitted requests hold their place
    rejected_before = (await app.stats())["rejected_requests"]
    try:
        async with async_client(app) as client:
            results = await asyncio.gather(*(trainer_reward(client, trainer, str(checkpoint[0]), s) for s in samples))
    finally:
        await scorer.set_faults.remote()
    rewards, outcomes = [r for r, _ in results], [o for _, o in results]
    stats = await app.stats()
    retries = sum(o.attempts - 1 for o in outcomes)
    print(f"{trainer}: {len(samples)} requests, {retries} client retries, "
          f"{stats['rejected_requests'] - rejected_before} queue-full answers inside the Gateway")  # fmt: skip
    assert None not in rewards, [o.statuses for o in outcomes]
    assert rewards == pytest.approx(expected, abs=TOL)
    assert all(o.statuses == [200] for o in outcomes)  # no 429 reached the trainer: nothing to retry
    assert stats["rejected_requests"] > rejected_before  # the burst did overflow the queue
    assert stats["queued_items"] == 0


async def test_native_routes_still_shed_load_with_429_and_retry_after(app: LiveApp, checkpoint, offline):
    """The SDK honours ``Retry-After``; the native routes keep answering a full queue with 429 at once."""
    samples = texts(checkpoint[1], 3 * QUEUE, seed=23)
    lengths = {len(offline.tokenize({"text": t})) for t in samples}
    scorer = app.scorer()
    await scorer.set_faults.remote(delays=dict.fromkeys(lengths, HOLD_S))
    try:
        async with async_client(app) as client:
            responses = await asyncio.gather(
                *(client.post("/v1/score", json={"items": [{"text": t}]}) for t in samples)
            )
    finally:
        await scorer.set_faults.remote()
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429}, statuses
    for response in responses:
        if response.status_code == 429:
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["type"] == "overloaded"
