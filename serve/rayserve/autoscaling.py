"""Autoscaling Scorer replicas on the items they hold, not on Serve's count of ongoing calls.

Serve's default autoscaling policy compares ``target_ongoing_requests`` with the handle calls in flight per
replica. A Gateway merges the requests that reach it together into one call (``coalescing.py``), so 64 busy clients
may be 4 calls or 24 depending on timing: that count says little about load. Each Scorer replica reports instead
the items it holds, queued or in a batch (``Scorer.record_autoscaling_stats``, Serve's custom autoscaling metrics),
and ``QueuedItemsPolicy`` asks for as many replicas as keep ``target_queued_items`` per replica. Serve applies
``min_replicas``/``max_replicas`` and the up/down-scale delays around it.

``ServerConfig.autoscaling`` turns it on (``rmserve serve --config``, ``serve deploy`` args alike)::

    autoscaling: {min_replicas: 1, max_replicas: 4, target_queued_items: 512}
"""

from __future__ import annotations

from typing import Any

QUEUED_ITEMS = "queued_items"  # the custom metric each Scorer replica reports


class QueuedItemsPolicy:
    """Serve autoscaling policy: replicas = items held by all replicas ÷ ``target_queued_items``."""

    def __init__(self, target_queued_items: float):
        self.target_queued_items = float(target_queued_items)

    def __call__(self, ctx: Any) -> tuple[float, dict]:
        held = (ctx.aggregated_metrics or {}).get(QUEUED_ITEMS) or {}
        if ctx.current_num_replicas == 0 or not held:  # nothing reported yet: keep the current target
            return ctx.target_num_replicas, {}
        return sum(held.values()) / self.target_queued_items, {}


def serve_autoscaling_config(settings: Any) -> dict[str, Any]:
    """The ``autoscaling_config`` of a Scorer deployment for ``ServerConfig.autoscaling``."""
    return {
        "min_replicas": settings.min_replicas,
        "max_replicas": settings.max_replicas,
        "upscale_delay_s": settings.upscale_delay_s,
        "downscale_delay_s": settings.downscale_delay_s,
        "metrics_interval_s": settings.metrics_interval_s,
        "look_back_period_s": settings.look_back_period_s,
        "policy": {
            "policy_function": QueuedItemsPolicy,
            "policy_kwargs": {"target_queued_items": settings.target_queued_items},
        },
    }
