"""Reading ``GET /metrics`` in tests that run a real server (integration, reliability, cluster): one scrape parsed
by prometheus_client's own parser, deltas between two scrapes, and each replica's own numbers from the application's
``MetricsHub`` deployment.

Example::

    before = await scrape(client)
    ...
    after = await scrape(client)
    assert after("items_scored_total") == n_items               # a fresh application: exact totals
    assert delta(before, after, "requests_total", route="/v1/score", status="200") == n_requests
    assert sum((await replica_numbers("rmserve", "scorer")).values()) == n_items
"""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

PREFIX = "rmserve_"


class Scrape:
    """One ``/metrics`` answer: ``scrape("items_scored_total")``, ``scrape("requests_total", route=..., status=...)``
    (0 for a series that is absent)."""

    def __init__(self, text: str):
        self.text = text
        self.samples: dict[tuple[str, tuple], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples.get((PREFIX + name, tuple(sorted(labels.items()))), 0.0)

    def series(self, name: str) -> dict[tuple, float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == PREFIX + name}


async def scrape(client: Any, prefix: str = "") -> Scrape:
    """``GET {prefix}/metrics`` with an ``httpx.AsyncClient``; checks the status and the content type."""
    response = await client.get(f"{prefix}/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scrape(response.text)


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after(name, **labels) - before(name, **labels)


async def replica_numbers(app_name: str, kind: str, metric: str = "items_scored") -> dict[str, float]:
    """``metric`` of each live replica of ``kind`` (``scorer`` or ``gateway``), from one collection of the app's hub."""
    from ray import serve

    from rmserve.serve.rayserve.metrics_hub import HUB_DEPLOYMENT

    hub = serve.get_deployment_handle(HUB_DEPLOYMENT, app_name=app_name)
    collected = await hub.collect.remote(5.0)
    return {m: snap.get(metric) for m, (k, snap, _) in collected["members"].items() if k == kind}


def check_totals(scraped: Scrape, *, items: int, input_tokens: int, requests: dict[tuple[str, str], int]) -> None:
    """Assert the exact totals of an application that has answered nothing but ``requests``
    (``{(route, status): count}``, every one of them) with ``items`` items of ``input_tokens`` tokens in all."""
    assert scraped("items_scored_total") == items
    assert scraped("input_tokens_total") == input_tokens
    assert scraped("batch_size_items_sum") == items  # each item in exactly one batch (no failures here)
    # Every token was computed once or saved (a shared prefix computed once, a cached prefix, a cached reward).
    assert scraped("forward_real_tokens_total") + scraped("prefix_tokens_saved_total") == input_tokens
    assert scraped("batch_padded_tokens_sum") == scraped("forward_padded_tokens_total")
    assert scraped("forward_padded_tokens_total") >= scraped("forward_real_tokens_total")
    series = scraped.series("requests_total")
    answered = {(dict(labels)["route"], dict(labels)["status"]): v for labels, v in series.items()}
    assert answered == requests
    for route in {route for route, _ in requests}:
        count = sum(n for (r, _), n in requests.items() if r == route)
        assert scraped("request_duration_seconds_count", route=route) == count, route
