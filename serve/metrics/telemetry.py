"""Reward telemetry: what a Gateway's answers look like, per model, for ``GET /metrics`` (the reward-hacking view).

For every answered request the Gateway calls ``RewardTelemetry.observe`` with the model's name (a served model's
id or an ensemble's name) and the rewards it returns: raw rewards (before the request's ``normalize``), or an
ensemble's combined reward. It records, labelled ``model``:

* ``rmserve_reward`` — histogram of the rewards;
* ``rmserve_reward_items_total`` / ``rmserve_reward_truncated_items_total`` — items and left-truncated items (their
  ``rate`` ratio is the truncation rate);
* ``rmserve_ensemble_spread`` — histogram of the ensemble members' disagreement per item;
* the latest ``window_items`` (reward, length) pairs of each model, whose moments ``snapshot`` reports; ``/metrics``
  derives ``rmserve_reward_rolling_mean``, ``rmserve_reward_rolling_std`` and ``rmserve_reward_length_correlation``
  from the moments summed over all Gateway replicas (so the window is the union of theirs).

**Length** is an item's token count as scored: prompt and response for pair items, after any left truncation
(for an ensemble, its first member's count). Within a GRPO/RLOO group or a best-of-n set, where the prompt is the
same, it differs from the response length by a constant, which leaves the correlation unchanged.

Example::

    telemetry = RewardTelemetry(recorder, window_items=1024)
    telemetry.observe("helpful", rewards=[0.3, 1.2], lengths=[40, 95], truncated=0)
    merge([recorder.snapshot(), telemetry.snapshot()])   # what /metrics renders from
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence

from rmserve.serve.config.settings import ServerConfig
from rmserve.serve.metrics.store import WINDOW_MOMENTS, MetricsRecorder, Snapshot

DEFAULT_WINDOW_ITEMS: int = ServerConfig.model_fields["reward_window_items"].default


class RewardTelemetry:
    """Per-model reward statistics of one Gateway replica (thread-safe)."""

    def __init__(self, recorder: MetricsRecorder, window_items: int = DEFAULT_WINDOW_ITEMS):
        self.recorder = recorder
        self.window_items = window_items
        self._windows: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def observe(
        self,
        model: str,
        rewards: Sequence[float],
        lengths: Sequence[int],
        truncated: int,
        spread: Sequence[float] | None = None,
    ) -> None:
        """One answer's rewards (``lengths[i]`` tokens for ``rewards[i]``; no lengths: the window skips them)."""
        self.recorder.inc("reward_items", len(rewards), model=model)
        self.recorder.inc("reward_truncated_items", truncated, model=model)
        for reward in rewards:
            self.recorder.observe("reward", reward, model=model)
        for value in spread or ():
            self.recorder.observe("ensemble_spread", value, model=model)
        if len(lengths) == len(rewards):
            with self._lock:
                window = self._windows.setdefault(model, deque(maxlen=self.window_items))
                window.extend(zip(rewards, lengths, strict=True))

    def snapshot(self) -> Snapshot:
        """The window moments of every model, as the internal ``reward_window_*`` gauges."""
        with self._lock:
            windows = {model: list(window) for model, window in self._windows.items()}
        snapshot = Snapshot()
        for model, pairs in windows.items():
            for name, value in window_moments(pairs).items():
                snapshot.values[(f"reward_window_{name}", (("model", model),))] = value
        return snapshot


def window_moments(pairs: Sequence[tuple[float, int]]) -> dict[str, float]:
    """``items`` and the sums ``WINDOW_MOMENTS`` names, of (reward, length) pairs (exactly rounded sums)."""
    rewards = [float(r) for r, _ in pairs]
    lengths = [float(n) for _, n in pairs]
    sums = {
        "rewards": math.fsum(rewards),
        "rewards_squared": math.fsum(r * r for r in rewards),
        "lengths": math.fsum(lengths),
        "lengths_squared": math.fsum(n * n for n in lengths),
        "products": math.fsum(r * n for r, n in zip(rewards, lengths, strict=True)),
    }
    return {"items": float(len(pairs)), **{name: sums[name] for name in WINDOW_MOMENTS}}
