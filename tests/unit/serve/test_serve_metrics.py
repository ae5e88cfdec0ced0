"""Metric recording, merging across replicas and Prometheus rendering, without Ray."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rmserve.serve.metrics.instrumentation import ScorerMetrics
from rmserve.serve.metrics.store import (
    CATALOGUE,
    ITEMS,
    PREFIX,
    SECONDS,
    Histogram,
    MetricsRecorder,
    Snapshot,
    merge,
    render,
)

MODEL = {"id": "rm-7b", "dtype": "bf16", "quantization": "none"}


def samples(text: bytes) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of an exposition, parsed by prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_histogram_buckets_are_upper_bounds_with_inf_last():
    h = Histogram.empty((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 2.0, 7.0):
        h.observe(v, (1.0, 2.0))
    assert h.counts == [2, 2, 1] and h.count == 5
    assert h.sum == pytest.approx(12.0, abs=1e-12)


def test_recorder_validates_names_labels_and_counter_direction():
    rec = MetricsRecorder()
    with pytest.raises(KeyError):
        rec.inc("no_such_metric")
    with pytest.raises(ValueError, match="takes labels"):
        rec.inc("requests", route="/v1/score")  # status missing
    with pytest.raises(ValueError, match="cannot decrease"):
        rec.inc("items_scored", -1)


def test_snapshot_is_a_copy():
    rec = MetricsRecorder()
    rec.inc("items_scored", 2)
    rec.observe("batch_size_items", 2)
    snap = rec.snapshot()
    rec.inc("items_scored", 5)
    rec.observe("batch_size_items", 5)
    assert snap.get("items_scored") == 2.0
    assert snap.histogram("batch_size_items").count == 1
    assert rec.snapshot().get("items_scored") == 7.0


def test_merge_sums_counters_histograms_and_gauges_and_keeps_info_at_one():
    a, b = ScorerMetrics(MODEL), ScorerMetrics(MODEL)
    a.on_request(items=3, input_tokens=30, truncated=1)
    b.on_request(items=5, input_tokens=41, truncated=0)
    a.on_forward(rows=3, padded_tokens=36, real_tokens=30, seconds=0.02)
    a.on_batch([10, 8, 12], padded_tokens=36)
    b.on_forward(rows=5, padded_tokens=50, real_tokens=41, seconds=0.03)
    b.on_batch([10] * 5, padded_tokens=50)
    a.on_rejected()
    total = merge([a.snapshot(queue_depth=2), b.snapshot(queue_depth=4, engine_counters={"oom_splits": 3})])
    assert total.get("items_scored") == 8.0
    assert total.get("input_tokens") == 71.0
    assert total.get("truncated_items") == 1.0
    assert total.get("queue_depth") == 6.0
    assert total.get("rejected_requests") == 1.0
    assert total.get("oom_splits") == 3.0
    assert total.get("scorer_replicas") == 2.0
    assert total.get("model_info", model="rm-7b", dtype="bf16", quantization="none") == 1.0
    sizes = total.histogram("batch_size_items")
    assert (sizes.count, sizes.sum) == (2, 8.0)
    padded = total.histogram("batch_padded_tokens")
    assert (padded.count, padded.sum) == (2, 86.0)


def test_batch_padded_tokens_are_what_each_batch_reports_and_forwards_only_time():
    m = ScorerMetrics(MODEL)
    m.on_forward(rows=2, padded_tokens=20, real_tokens=19, seconds=0.01)
    m.on_forward(rows=1, padded_tokens=64, real_tokens=64, seconds=0.01)
    m.on_batch([10, 9, 64], padded_tokens=84)
    m.on_forward(rows=1, padded_tokens=7, real_tokens=7, seconds=0.01)
    m.on_batch([7], padded_tokens=7)
    snapshot = m.recorder.snapshot()
    padded = snapshot.histogram("batch_padded_tokens")
    assert (padded.count, padded.sum) == (2, 91.0)
    assert snapshot.histogram("forward_duration_seconds").count == 3


def test_forward_tokens_come_from_the_engine_counters_only():
    """The engine keeps its totals (``EngineStats``); the snapshot reads them and never counts them again."""
    m = ScorerMetrics(MODEL)
    m.on_forward(rows=2, padded_tokens=20, real_tokens=19, seconds=0.01)
    m.on_batch([10, 9], padded_tokens=20)
    assert m.snapshot(queue_depth=0).get("forward_padded_tokens") == 0.0
    snap = m.snapshot(queue_depth=0, engine_counters={"forward_real_tokens": 19, "forward_padded_tokens": 20})
    assert (snap.get("forward_real_tokens"), snap.get("forward_padded_tokens")) == (19.0, 20.0)
    assert m.counts(snap)["batching"] == {"batches": 1, "items": 2, "recent_batch_sizes": [2]}


def test_monotonic_part_drops_gauges_and_info():
    m = ScorerMetrics(MODEL)
    m.on_request(items=4, input_tokens=9, truncated=0)
    m.on_batch([1, 2, 3, 3], padded_tokens=12)
    m.on_rejected()
    m.on_rejected()
    kept = m.snapshot(queue_depth=5, engine_counters={"oom_splits": 1}).monotonic_part()
    assert kept.get("items_scored") == 4.0 and kept.get("rejected_requests") == 2.0
    assert kept.get("queue_depth") == 0.0 and kept.get("scorer_replicas") == 0.0
    assert kept.get("model_info", model="rm-7b", dtype="bf16", quantization="none") == 0.0
    assert kept.histogram("batch_size_items").count == 1


def test_render_exposes_every_metric_with_the_prefix_and_exact_values():
    m = ScorerMetrics(MODEL)
    m.on_request(items=3, input_tokens=30, truncated=1)
    m.on_forward(rows=3, padded_tokens=40, real_tokens=30, seconds=0.004)
    m.on_batch([10, 8, 12], padded_tokens=40)
    snap = m.snapshot(queue_depth=1, engine_counters={"forward_real_tokens": 30, "forward_padded_tokens": 40})
    snap.add(_gateway_snapshot())
    text = render(snap)
    got = samples(text)
    assert got[(PREFIX + "items_scored_total", ())] == 3.0
    assert got[(PREFIX + "input_tokens_total", ())] == 30.0
    assert got[(PREFIX + "padding_efficiency", ())] == pytest.approx(0.75, abs=1e-12)
    assert got[(PREFIX + "queue_depth", ())] == 1.0
    assert got[(PREFIX + "model_info", (("dtype", "bf16"), ("model", "rm-7b"), ("quantization", "none")))] == 1.0
    assert got[(PREFIX + "batch_size_items_count", ())] == 1.0
    assert got[(PREFIX + "batch_size_items_bucket", (("le", "2.0"),))] == 0.0
    assert got[(PREFIX + "batch_size_items_bucket", (("le", "4.0"),))] == 1.0
    assert got[(PREFIX + "batch_size_items_bucket", (("le", "+Inf"),))] == 1.0
    assert got[(PREFIX + "forward_duration_seconds_bucket", (("le", "0.005"),))] == 1.0
    assert got[(PREFIX + "requests_total", (("route", "/v1/score"), ("status", "200")))] == 2.0
    assert got[(PREFIX + "requests_total", (("route", "/v1/score"), ("status", "429")))] == 1.0
    assert got[(PREFIX + "request_duration_seconds_count", (("route", "/v1/score"),))] == 3.0
    names = {family.name for family in text_string_to_metric_families(text.decode())}
    assert names == {PREFIX + spec.name for spec in CATALOGUE}


def test_render_of_nothing_is_zeros_and_padding_efficiency_one():
    got = samples(render(Snapshot()))
    assert got[(PREFIX + "items_scored_total", ())] == 0.0
    assert got[(PREFIX + "padding_efficiency", ())] == 1.0
    assert got[(PREFIX + "batch_size_items_bucket", (("le", "+Inf"),))] == 0.0
    assert len([k for k in got if k[0] == PREFIX + "batch_size_items_bucket"]) == len(ITEMS) + 1
    assert not [k for k in got if k[0] == PREFIX + "requests_total"]  # labelled: no series until a request


@pytest.mark.skipif(
    shutil.which("promtool") is None and not os.environ.get("CI"),
    reason="promtool not installed (apt-get install prometheus)",
)
def test_promtool_accepts_the_rendering():
    snap = _gateway_snapshot()
    snap.add(ScorerMetrics(MODEL).snapshot(queue_depth=0))
    result = subprocess.run(["promtool", "check", "metrics"], input=render(snap), capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def _gateway_snapshot() -> Snapshot:
    rec = MetricsRecorder()
    for status, seconds in (("200", 0.01), ("200", 0.3), ("429", 0.001)):
        rec.inc("requests", route="/v1/score", status=status)
        rec.observe("request_duration_seconds", seconds, route="/v1/score")
    assert SECONDS[0] == 0.001
    return rec.snapshot()
