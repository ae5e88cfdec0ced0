"""Prefix-affinity routing through real Ray Serve: GRPO samples sent one per request to 2 Scorer replicas save as
many prompt tokens as one replica does (the router keeps each group on one replica), rewards stay exact; the same
traffic through Serve's default router (power of two choices) is measured next to it.

Three apps share the module's Ray instance: one Scorer replica, two with ``routing.policy: prefix_affinity`` (the
default) and two with ``power_of_two``.
"""

from __future__ import annotations

import random

import httpx
import pytest
from serve_harness import async_client, demo_config, running_app
from test_serve_prefix_sharing import TOPICS, score_per_sample

from rmserve.model import load_reward_model
from rmserve.serve import build_app

pytestmark = pytest.mark.ray

TOL = 1e-5
SETUPS = {  # app name -> (route prefix, config overrides)
    "affinity": ("/affinity", {"replicas": 2}),
    "pow2": ("/pow2", {"replicas": 2, "routing": {"policy": "power_of_two"}}),
}


def grpo_requests(seed: int) -> list[dict]:
    """8 groups of 8 samples, one sample per request, groups interleaved. The prompts are long (~500 tokens) so
    that sharing one always beats computing it twice: what a replica saves then depends on routing alone, not on
    how its batches happened to be cut."""
    rng = random.Random(seed)
    prompts = [f"Tell me about {topic}. " + " ".join(rng.choice(TOPICS) for _ in range(160)) for topic in TOPICS]
    return [
        {"items": [{"prompt": prompt, "response": f"Sample {k}: {rng.choice(TOPICS)} and {rng.choice(TOPICS)}."}]}
        for k in range(8)
        for prompt in prompts
    ]


@pytest.fixture(scope="module")
def apps(demo_model_dir):
    """The one-replica app at ``/``, then the two-replica apps at their prefixes."""
    from ray import serve

    with running_app(demo_config(demo_model_dir), ray_cpus=8) as live:
        for name, (prefix, overrides) in SETUPS.items():
            serve.run(
                build_app(demo_config(demo_model_dir, app_name=name, **overrides)), name=name, route_prefix=prefix
            )
        yield live
        for name in SETUPS:
            serve.delete(name)


@pytest.fixture(scope="module")
def reference(apps):
    return load_reward_model(apps.config.model_spec(), prefix_sharing="off", reward_cache_items=0)


async def saved_per_item(client: httpx.AsyncClient, prefix: str, requests: list[dict], reference) -> float:
    """Send GRPO samples one per request, all at once; check every reward; prefix tokens saved per item."""
    _, _, saved = await score_per_sample(client, requests, reference, prefix)
    return saved / len(requests)


async def test_two_replicas_with_affinity_save_what_one_replica_saves(apps, reference):
    saved = {}
    async with async_client(apps) as client:
        for seed in (11, 12):  # two rounds of new prompts: the second meets replicas that already hold others
            requests = grpo_requests(seed)
            for name, prefix in (("one replica", ""), *((n, p) for n, (p, _) in SETUPS.items())):
                saved.setdefault(name, []).append(await saved_per_item(client, prefix, requests, reference))
    for name, values in saved.items():
        print(f"{name}: prefix tokens saved per item {', '.join(f'{v:.1f}' for v in values)}")
    for one, affine in zip(saved["one replica"], saved["affinity"], strict=True):
        assert affine >= 0.9 * one > 0
