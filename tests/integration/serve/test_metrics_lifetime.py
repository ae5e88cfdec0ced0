"""Issue 13, the metrics path, against a real Ray Serve app with two Scorer replicas: ``/metrics`` totals are exact
(every item, token and request once), the collector is a deployment of the application (``serve delete`` leaves no
metrics actor behind), and a redeploy, with or without a delete first, counts from zero.

The tests redeploy the module's application themselves, so each starts from a fresh one whatever ran before.
"""

from __future__ import annotations

import asyncio

import pytest
from metrics_scrape import check_totals, replica_numbers, scrape
from serve_harness import APP_NAME, LiveApp, async_client, demo_config, running_app

from rmserve.serve import build_app
from rmserve.serve.rayserve.metrics_hub import HUB_DEPLOYMENT

# Redeploys and serve.delete: about a minute of Ray deployments for a metrics-lifetime regression; `make test-all`.
pytestmark = [pytest.mark.ray, pytest.mark.slow]

SIZES = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 1, 1]


@pytest.fixture(scope="module")
def app(demo_model_dir):
    with running_app(config_of(demo_model_dir), ray_cpus=3) as live:
        yield live


def config_of(model_dir, **overrides):
    return demo_config(model_dir, replicas=2, batching={"batch_wait_timeout_s": 0.01}, **overrides)


async def deploy(config) -> None:
    from ray import serve

    await asyncio.to_thread(serve.run, build_app(config), name=APP_NAME, route_prefix="/")


def app_actors() -> list[str]:
    """Named actors, in every namespace, of the application (Serve names each replica
    ``SERVE_REPLICA::<app>#<deployment>#<id>``) or of rmserve at all (the old collector was ``rmserve-metrics:<app>``).
    """
    import ray

    names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)]
    return [name for name in names if f"{APP_NAME}#" in name or "rmserve" in name.lower()]


async def score_known_requests(client, start: int) -> tuple[int, int]:
    """Score ``SIZES`` requests at once (distinct items); returns (items, input tokens)."""
    requests = [
        [{"prompt": f"Question {start + 100 * k + j} about rivers?", "response": f"Answer {j}."} for j in range(n)]
        for k, n in enumerate(SIZES)
    ]
    responses = await asyncio.gather(*(client.post("/v1/score", json={"items": items}) for items in requests))
    assert [r.status_code for r in responses] == [200] * len(requests), [r.text for r in responses]
    return sum(SIZES), sum(r.json()["usage"]["input_tokens"] for r in responses)


async def test_a_redeploy_with_changed_args_starts_from_zero_and_totals_stay_exact(app: LiveApp, demo_model_dir):
    async with async_client(app) as client:
        await score_known_requests(client, 0)  # the build being replaced has counted something
        assert (await scrape(client))("items_scored_total") > 0
    await deploy(config_of(demo_model_dir, reward_window_items=512))  # new args: every deployment restarts
    async with async_client(app) as client:
        first = await scrape(client)
        check_totals(first, items=0, input_tokens=0, requests={})
        items, tokens = await score_known_requests(client, 10_000)
        after = await scrape(client)
    requests = {("/v1/score", "200"): len(SIZES), ("/metrics", "200"): 1}  # the first scrape counts once answered
    check_totals(after, items=items, input_tokens=tokens, requests=requests)
    assert (after("scorer_replicas"), after("gateway_replicas")) == (2, 1)
    # Both replicas did part of the work, so the totals above really are sums over replicas.
    per_replica = await replica_numbers(APP_NAME, "scorer")
    assert len(per_replica) == 2 and sum(per_replica.values()) == items
    assert all(v > 0 for v in per_replica.values()), per_replica


async def test_serve_delete_leaves_no_metrics_actor_and_a_redeploy_counts_from_zero(app: LiveApp, demo_model_dir):
    from ray import serve

    config = config_of(demo_model_dir)
    await deploy(config)
    async with async_client(app) as client:
        await score_known_requests(client, 20_000)
    assert any(f"{APP_NAME}#{HUB_DEPLOYMENT}#" in name for name in app_actors()), app_actors()
    await asyncio.to_thread(serve.delete, APP_NAME)
    for _ in range(300):  # Serve has stopped the replicas; their actors' names go once the processes are gone
        if not app_actors():
            break
        await asyncio.sleep(0.1)
    assert app_actors() == []
    await deploy(config)  # the same args after a delete: a new application
    async with async_client(app) as client:
        items, tokens = await score_known_requests(client, 30_000)
        after = await scrape(client)
    check_totals(after, items=items, input_tokens=tokens, requests={("/v1/score", "200"): len(SIZES)})
