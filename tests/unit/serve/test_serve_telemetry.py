"""Issue 12: reward telemetry per model, recorded and rendered without Ray, against values computed offline."""

from __future__ import annotations

import math
import os
import shutil
import subprocess

import numpy as np
import pytest
from test_serve_metrics import samples

from rmserve.serve.metrics.store import PREFIX, REWARDS, SPREADS, MetricsRecorder, merge, render, window_statistics
from rmserve.serve.metrics.telemetry import RewardTelemetry, window_moments


def scrape(recorder: MetricsRecorder, *telemetry: RewardTelemetry) -> dict[tuple[str, tuple], float]:
    return samples(render(merge([recorder.snapshot(), *(t.snapshot() for t in telemetry)])))


def cumulative_buckets(values: np.ndarray, bounds: tuple[float, ...]) -> list[int]:
    """Prometheus buckets (le = upper bound, inclusive), computed offline."""
    return [int((values <= b).sum()) for b in bounds] + [len(values)]


def model(name: str) -> tuple:
    return (("model", name),)


def test_histogram_mean_and_length_correlation_equal_offline_values():
    rng = np.random.default_rng(0)
    rewards = rng.normal(0.3, 2.0, size=300)
    lengths = rng.integers(5, 400, size=300)
    recorder = MetricsRecorder()
    telemetry = RewardTelemetry(recorder, window_items=1024)
    for start in range(0, 300, 7):  # answers of various sizes
        chunk = slice(start, start + 7)
        telemetry.observe("helpful", list(rewards[chunk]), list(lengths[chunk]), truncated=1)
    got = scrape(recorder, telemetry)
    bounds = [("+Inf" if k == len(REWARDS) else repr(float(b))) for k, b in enumerate((*REWARDS, math.inf))]
    expected = cumulative_buckets(rewards, REWARDS)
    for le, count in zip(bounds, expected, strict=True):
        assert got[(PREFIX + "reward_bucket", (("le", le), ("model", "helpful")))] == count, le
    assert got[(PREFIX + "reward_count", model("helpful"))] == 300
    assert got[(PREFIX + "reward_sum", model("helpful"))] == pytest.approx(rewards.sum(), abs=1e-9)
    assert got[(PREFIX + "reward_items_total", model("helpful"))] == 300
    assert got[(PREFIX + "reward_truncated_items_total", model("helpful"))] == 43  # one per answer
    assert got[(PREFIX + "reward_rolling_mean", model("helpful"))] == pytest.approx(rewards.mean(), abs=1e-9)
    assert got[(PREFIX + "reward_rolling_std", model("helpful"))] == pytest.approx(rewards.std(), abs=1e-9)
    corr = np.corrcoef(rewards, lengths)[0, 1]
    assert got[(PREFIX + "reward_length_correlation", model("helpful"))] == pytest.approx(corr, abs=1e-9)


def test_the_window_keeps_the_latest_items_and_gateways_add_up():
    a, b = RewardTelemetry(MetricsRecorder(), window_items=4), RewardTelemetry(MetricsRecorder(), window_items=4)
    a.observe("m", [9.0, 9.0, 1.0, 2.0, 3.0, 4.0], [1, 1, 10, 20, 30, 41], truncated=0)  # the 9s leave the window
    b.observe("m", [5.0, 7.0], [50, 75], truncated=0)
    got = scrape(MetricsRecorder(), a, b)
    pooled_r, pooled_n = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 7.0]), np.array([10, 20, 30, 41, 50, 75])
    assert got[(PREFIX + "reward_window_items", model("m"))] == 6
    assert got[(PREFIX + "reward_rolling_mean", model("m"))] == pytest.approx(pooled_r.mean(), abs=1e-12)
    assert got[(PREFIX + "reward_rolling_std", model("m"))] == pytest.approx(pooled_r.std(), abs=1e-12)
    corr = np.corrcoef(pooled_r, pooled_n)[0, 1]
    assert got[(PREFIX + "reward_length_correlation", model("m"))] == pytest.approx(corr, abs=1e-12)


def test_models_are_kept_apart_and_ensembles_record_their_spread():
    recorder = MetricsRecorder()
    telemetry = RewardTelemetry(recorder)
    telemetry.observe("helpful", [1.0, 2.0], [3, 4], truncated=0)
    spread = [0.0, 0.07, 0.4, 9.0]
    telemetry.observe("both", [0.5, -0.5, 0.1, 0.2], [3, 4, 5, 6], truncated=2, spread=spread)
    got = scrape(recorder, telemetry)
    assert got[(PREFIX + "reward_count", model("helpful"))] == 2
    assert got[(PREFIX + "reward_count", model("both"))] == 4
    assert got[(PREFIX + "reward_truncated_items_total", model("both"))] == 2
    assert (PREFIX + "ensemble_spread_count", model("helpful")) not in got
    expected = cumulative_buckets(np.array(spread), SPREADS)
    assert got[(PREFIX + "ensemble_spread_bucket", (("le", "0.1"), ("model", "both")))] == expected[2] == 2
    assert got[(PREFIX + "ensemble_spread_bucket", (("le", "+Inf"), ("model", "both")))] == 4


def test_correlation_is_nan_when_undefined():
    constant = window_statistics(3, window_moments([(1.0, 5), (2.0, 5), (3.0, 5)]))
    assert math.isnan(constant["reward_length_correlation"])
    assert constant["reward_rolling_mean"] == 2.0
    single = window_statistics(1, window_moments([(1.0, 5)]))
    assert math.isnan(single["reward_length_correlation"]) and single["reward_rolling_std"] == 0.0


def test_no_telemetry_series_before_any_answer():
    got = scrape(MetricsRecorder(), RewardTelemetry(MetricsRecorder()))
    assert not [k for k in got if k[0].startswith(PREFIX + "reward_") and "cache" not in k[0]]


@pytest.mark.skipif(
    shutil.which("promtool") is None and not os.environ.get("CI"),
    reason="promtool not installed (apt-get install prometheus)",
)
def test_promtool_accepts_the_telemetry():
    recorder = MetricsRecorder()
    telemetry = RewardTelemetry(recorder)
    telemetry.observe("helpful", [1.0, 2.0], [3, 3], truncated=0)  # constant lengths: a NaN correlation
    telemetry.observe("both", [0.5], [3], truncated=0, spread=[0.2])
    text = render(merge([recorder.snapshot(), telemetry.snapshot()]))
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
