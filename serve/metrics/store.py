"""Prometheus metrics (prefix ``rmserve_``) as plain values: record them in a replica, merge replicas, render.

Every replica (Scorer and Gateway alike) records into its own ``MetricsRecorder``: counters, gauges and
histogram bucket counts in plain Python, no ``prometheus_client`` registry and no Ray (a Scorer's snapshot
adds the totals its engine keeps itself, ``instrumentation.py``). ``GET /metrics`` must show totals across
all replicas, so the numbers travel as ``Snapshot`` objects: the Gateway asks the application's
``MetricsHub`` (``metrics_hub.py``), which gathers a fresh snapshot from every live replica, and ``render``
turns the ``merge`` of them into the Prometheus text format with ``prometheus_client``. Counters and
histograms of replicas that went away stay in the totals (the hub keeps their last snapshot), so totals
never go down while the application lives; a restarted replica is a new one, from 0.

Example::

    recorder = MetricsRecorder()
    recorder.inc("items_scored", 3)
    recorder.observe("batch_size_items", 3)
    render(merge([recorder.snapshot(), other_replica_snapshot]))   # b"# HELP rmserve_items_scored_total ..."
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample

PREFIX = "rmserve_"
# Prometheus' classic text format, which every Prometheus version and promtool parse.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Sleep and wake: milliseconds (level 1 on a CPU) to minutes (reloading a large checkpoint).
TRANSITION_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ITEMS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
TOKENS = tuple(2**k for k in range(6, 21))  # 64 .. 1,048,576
# Rewards: symmetric around 0, fine near the normalised range and coarse out to raw rewards of typical RMs.
REWARDS = (-10.0, -5.0, -3.0, -2.0, -1.5, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
# Ensemble disagreement: a standard deviation of normalised rewards (0 = the members agree).
SPREADS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)

Labels = tuple[tuple[str, str], ...]
Key = tuple[str, Labels]


@dataclass(frozen=True)
class MetricSpec:
    """One metric: ``name`` without the prefix (and, for counters, without the ``_total`` Prometheus adds)."""

    name: str
    kind: Literal["counter", "gauge", "histogram", "info"]
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    # How replicas' values of a gauge combine: their sum, or the lowest (a state every replica has reached).
    combine: Literal["sum", "min"] = "sum"


CATALOGUE = (
    # -- Gateway (HTTP) ---------------------------------------------------------------------------
    MetricSpec("requests", "counter", "HTTP requests answered, by route and status code.", ("route", "status")),
    MetricSpec("request_duration_seconds", "histogram", "HTTP request latency by route.", ("route",), SECONDS),
    # -- Scorer: requests and items ---------------------------------------------------------------
    MetricSpec("items_scored", "counter", "Items of requests answered with rewards (HTTP and handle callers)."),
    MetricSpec("input_tokens", "counter", "Input tokens of the scored items (the sum of usage.input_tokens)."),
    MetricSpec("truncated_items", "counter", "Scored items that were left-truncated to max_length."),
    MetricSpec("rejected_requests", "counter", "Requests a Scorer replica refused with 429 (its item queue full)."),
    MetricSpec(
        "client_gone_items",
        "counter",
        "Items dropped before their forward pass because their caller went away (client disconnect or deadline).",
    ),
    MetricSpec("queue_depth", "gauge", "Items queued or being scored, summed over Scorer replicas."),
    # -- Scorer: batches and forward passes -------------------------------------------------------
    MetricSpec("batch_size_items", "histogram", "Items per batch (one engine call, across requests).", (), ITEMS),
    MetricSpec(
        "batch_padded_tokens", "histogram", "Padded tokens one batch computed (its forward passes).", (), TOKENS
    ),
    MetricSpec("forward_duration_seconds", "histogram", "Latency of one forward pass (micro-batch).", (), SECONDS),
    MetricSpec("forward_real_tokens", "counter", "Real (non-padding) tokens run through forward passes."),
    MetricSpec("forward_padded_tokens", "counter", "Padded tokens (rows x longest row) run through forward passes."),
    MetricSpec("padding_efficiency", "gauge", "forward_real_tokens / forward_padded_tokens (1 before any forward)."),
    MetricSpec("oom_splits", "counter", "Micro-batches split in half after running out of accelerator memory."),
    # -- Scorer: prefix sharing and the caches ----------------------------------------------------
    MetricSpec("prefix_cache_hits", "counter", "Items whose forward started from cached prefix keys/values."),
    MetricSpec("prefix_cache_misses", "counter", "Items computed from their first token (no shared prefix found)."),
    MetricSpec(
        "prefix_tokens_saved",
        "counter",
        "Tokens of scored items that no forward computed: shared prefixes computed once, cached prefixes, and "
        "items answered from the reward cache.",
    ),
    MetricSpec("prefix_cache_bytes", "gauge", "Bytes of prefix keys/values held, summed over Scorer replicas."),
    MetricSpec("reward_cache_hits", "counter", "Items answered without a forward (an exact duplicate's reward)."),
    MetricSpec("reward_cache_misses", "counter", "Items not found in the reward cache."),
    MetricSpec("reward_cache_items", "gauge", "Rewards held by the reward caches, summed over Scorer replicas."),
    # -- Scorer: sleep and wake (POST /sleep, /wake_up) --------------------------------------------
    MetricSpec(
        "sleep_level",
        "gauge",
        "Sleep level of a served model: 0 awake, 1 weights in host memory, 2 weights dropped; the lowest over its "
        "Scorer replicas (1 or 2 only once every replica sleeps at least that deep).",
        ("model",),
        combine="min",
    ),
    MetricSpec(
        "sleep_transition_seconds",
        "histogram",
        "Time one replica took to fall asleep (waiting for the work it had admitted included) or to wake up, by "
        "model, transition (sleep, wake) and level.",
        ("model", "transition", "level"),
        TRANSITION_SECONDS,
    ),
    # -- Deployment -------------------------------------------------------------------------------
    MetricSpec("model_info", "info", "The served model (value 1).", ("model", "dtype", "quantization")),
    MetricSpec("scorer_replicas", "gauge", "Scorer replicas whose numbers this scrape includes."),
    MetricSpec("gateway_replicas", "gauge", "Gateway replicas whose numbers this scrape includes."),
    # -- Reward telemetry (Gateways, by model: a served model's id or an ensemble's name; telemetry.py) ---------
    MetricSpec(
        "reward",
        "histogram",
        "Rewards returned, by model: raw rewards (before a request's normalize), an ensemble's combined reward.",
        ("model",),
        REWARDS,
    ),
    MetricSpec(
        "reward_items", "counter", "Items answered with rewards, by model (an ensemble's count once).", ("model",)
    ),
    MetricSpec(
        "reward_truncated_items",
        "counter",
        "Items answered that were left-truncated to max_length, by model.",
        ("model",),
    ),
    MetricSpec(
        "reward_rolling_mean", "gauge", "Mean reward of the latest reward_window_items items, by model.", ("model",)
    ),
    MetricSpec(
        "reward_rolling_std",
        "gauge",
        "Standard deviation (population) of the rewards of the latest reward_window_items items, by model.",
        ("model",),
    ),
    MetricSpec(
        "reward_length_correlation",
        "gauge",
        "Pearson correlation between reward and length in tokens (the item as scored, after truncation) over the "
        "latest reward_window_items items, by model; rising towards 1 is the length-hacking signal. NaN when "
        "undefined (fewer than 2 items, or constant rewards or lengths).",
        ("model",),
    ),
    MetricSpec(
        "ensemble_spread",
        "histogram",
        "Ensembles: the members' disagreement per item (weighted standard deviation of their normalised rewards).",
        ("model",),
        SPREADS,
    ),
    # The moments behind the rolling gauges: sums over each Gateway's window, added up across Gateways.
    *(
        MetricSpec(f"reward_window_{name}", "gauge", f"Rolling window, by model: {text}.", ("model",))
        for name, text in (
            ("items", "items in the windows"),
            ("rewards", "sum of the rewards"),
            ("rewards_squared", "sum of the squared rewards"),
            ("lengths", "sum of the lengths in tokens"),
            ("lengths_squared", "sum of the squared lengths"),
            ("products", "sum of reward x length"),
        )
    ),
)
SPECS = {spec.name: spec for spec in CATALOGUE}
# Derived at render time from other metrics, never recorded.
DERIVED = frozenset({"padding_efficiency", "reward_rolling_mean", "reward_rolling_std", "reward_length_correlation"})


@dataclass
class Histogram:
    """Per-bucket counts (not cumulative; the last bucket is +Inf) and the sum of observed values."""

    counts: list[int]
    sum: float = 0.0

    @classmethod
    def empty(cls, bounds: tuple[float, ...]) -> Histogram:
        return cls([0] * (len(bounds) + 1))

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, value: float, bounds: tuple[float, ...]) -> None:
        self.counts[_bucket(value, bounds)] += 1
        self.sum += value

    def add(self, other: Histogram) -> None:
        if len(other.counts) != len(self.counts):
            raise ValueError("histograms with different buckets cannot be merged")
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum


def _bucket(value: float, bounds: tuple[float, ...]) -> int:
    for k, bound in enumerate(bounds):
        if value <= bound:
            return k
    return len(bounds)


@dataclass
class Snapshot:
    """The metric values of one replica, or the merge of several: plain, picklable data."""

    values: dict[Key, float] = field(default_factory=dict)  # counters, gauges, info
    histograms: dict[Key, Histogram] = field(default_factory=dict)

    def get(self, name: str, **labels: str) -> float:
        """A counter, gauge or info value (0 when absent); for tests and the derived gauges."""
        return self.values.get(_key(name, labels), 0.0)

    def histogram(self, name: str, **labels: str) -> Histogram:
        return self.histograms.get(_key(name, labels)) or Histogram.empty(SPECS[name].buckets)

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set a value read from a store of its own (a gauge, or a counter another object keeps)."""
        self.values[_key(name, labels)] = float(value)

    def add(self, other: Snapshot) -> None:
        """Add ``other`` into this one: counters and histograms sum, gauges sum (those whose spec says ``min``: the
        lowest value), info series are set to 1."""
        for key, value in other.values.items():
            spec = SPECS[key[0]]
            if spec.kind == "info":
                self.values[key] = 1.0
            elif spec.combine == "min":
                self.values[key] = min(self.values.get(key, value), value)
            else:
                self.values[key] = self.values.get(key, 0.0) + value
        for key, hist in other.histograms.items():
            mine = self.histograms.setdefault(key, Histogram.empty(SPECS[key[0]].buckets))
            mine.add(hist)

    def monotonic_part(self) -> Snapshot:
        """Only the counters and histograms: what a departed replica leaves in the totals."""
        kept = Snapshot()
        for key, value in self.values.items():
            if SPECS[key[0]].kind == "counter":
                kept.values[key] = value
        kept.histograms = {key: Histogram(list(h.counts), h.sum) for key, h in self.histograms.items()}
        return kept


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Totals across replicas."""
    total = Snapshot()
    for snapshot in snapshots:
        total.add(snapshot)
    return total


def _key(name: str, labels: dict[str, object]) -> Key:
    spec = SPECS.get(name)
    if spec is None:
        raise KeyError(f"unknown metric {name!r}")
    if set(labels) != set(spec.labels):
        raise ValueError(f"metric {name!r} takes labels {spec.labels}, got {tuple(sorted(labels))}")
    return name, tuple((label, str(labels[label])) for label in spec.labels)


class MetricsRecorder:
    """The metrics of one replica. Thread-safe: the Scorer records from its forward thread and its event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot = Snapshot()

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        """Add to a counter (``amount`` >= 0)."""
        if amount < 0:
            raise ValueError(f"counter {name!r} cannot decrease (amount {amount})")
        key = _key(name, labels)
        with self._lock:
            self._snapshot.values[key] = self._snapshot.values.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set a gauge or an info series (value 1)."""
        key = _key(name, labels)
        with self._lock:
            self._snapshot.values[key] = float(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = _key(name, labels)
        bounds = SPECS[name].buckets
        with self._lock:
            self._snapshot.histograms.setdefault(key, Histogram.empty(bounds)).observe(value, bounds)

    def snapshot(self) -> Snapshot:
        """A copy of the current values."""
        with self._lock:
            copy = Snapshot(values=dict(self._snapshot.values))
            copy.histograms = {k: Histogram(list(h.counts), h.sum) for k, h in self._snapshot.histograms.items()}
        return copy


class _SnapshotCollector:
    """A ``prometheus_client`` collector over one (merged) snapshot; every catalogued metric appears."""

    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        for spec in CATALOGUE:
            yield self._family(spec)

    def _family(self, spec: MetricSpec) -> Metric:
        name, labels = PREFIX + spec.name, list(spec.labels)
        series = sorted((key[1], value) for key, value in self.snapshot.values.items() if key[0] == spec.name)
        if spec.kind == "counter":
            family = CounterMetricFamily(name, spec.help, labels=labels)
            for label_values, value in series or ([((), 0.0)] if not labels else []):
                family.add_metric([v for _, v in label_values], value)
            return family
        if spec.kind == "histogram":
            family = HistogramMetricFamily(name, spec.help, labels=labels)
            hists = sorted((key[1], h) for key, h in self.snapshot.histograms.items() if key[0] == spec.name)
            for label_values, hist in hists or ([((), Histogram.empty(spec.buckets))] if not labels else []):
                values = [v for _, v in label_values]
                family.add_metric(values, _cumulative(hist, spec.buckets), hist.sum)
                if spec.buckets[0] < 0:  # prometheus_client leaves _count and _sum out then (an OpenMetrics rule)
                    series = dict(zip(labels, values, strict=True))
                    family.samples.append(Sample(name + "_count", series, float(hist.count)))
                    family.samples.append(Sample(name + "_sum", series, hist.sum))
            return family
        family = GaugeMetricFamily(name, spec.help, labels=labels)
        if spec.name == "padding_efficiency":
            series = [((), self._padding_efficiency())]
        elif spec.name in DERIVED:
            series = self._window_statistic(spec.name)
        for label_values, value in series or ([((), 0.0)] if not labels else []):
            family.add_metric([v for _, v in label_values], value)
        return family

    def _window_statistic(self, name: str) -> list[tuple[Labels, float]]:
        """A rolling gauge of every model with a window, from the merged window moments."""
        out = []
        for key, count in sorted(self.snapshot.values.items()):
            if key[0] != "reward_window_items" or count <= 0:
                continue
            labels = dict(key[1])
            moments = {m: self.snapshot.get(f"reward_window_{m}", **labels) for m in WINDOW_MOMENTS}
            out.append((key[1], window_statistics(count, moments)[name]))
        return out

    def _padding_efficiency(self) -> float:
        padded = self.snapshot.get("forward_padded_tokens")
        return self.snapshot.get("forward_real_tokens") / padded if padded else 1.0


# Names avoid the _sum/_count/_total suffixes Prometheus reserves for histograms, summaries and counters.
WINDOW_MOMENTS = ("rewards", "rewards_squared", "lengths", "lengths_squared", "products")


def window_statistics(count: float, moments: dict[str, float]) -> dict[str, float]:
    """Mean and standard deviation of the rewards, and their Pearson correlation with length, from the sums
    ``WINDOW_MOMENTS`` names (of rewards, squared rewards, lengths, squared lengths, reward x length) of ``count``
    items."""
    mean = moments["rewards"] / count
    mean_length = moments["lengths"] / count
    var = max(moments["rewards_squared"] / count - mean * mean, 0.0)
    var_length = max(moments["lengths_squared"] / count - mean_length * mean_length, 0.0)
    cov = moments["products"] / count - mean * mean_length
    # A variance within rounding error of zero (constant values) leaves the correlation undefined.
    defined = count >= 2 and var > 1e-12 * (1.0 + mean * mean) and var_length > 1e-12 * (1.0 + mean_length**2)
    correlation = max(-1.0, min(1.0, cov / math.sqrt(var * var_length))) if defined else math.nan
    return {
        "reward_rolling_mean": mean,
        "reward_rolling_std": math.sqrt(var),
        "reward_length_correlation": correlation,
    }


def _cumulative(hist: Histogram, bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    out, running = [], 0
    for bound, count in zip((*bounds, math.inf), hist.counts, strict=True):
        running += count
        out.append(("+Inf" if math.isinf(bound) else _format_bound(bound), running))
    return out


def _format_bound(bound: float) -> str:
    return str(int(bound)) + ".0" if float(bound).is_integer() else repr(float(bound))


def render(snapshot: Snapshot) -> bytes:
    """The Prometheus text exposition of ``snapshot`` (send it with ``CONTENT_TYPE``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry)


class ServedMetrics(Protocol):
    """What the HTTP edge needs of a server's metrics: a recorder for its own counts, extra snapshot sources, and the
    scrape of ``GET /metrics`` (``LocalMetrics`` in one process, the Ray runtime's ``ClusterMetrics`` over replicas)."""

    recorder: MetricsRecorder
    sources: list[Callable[[], Snapshot]]
    content_type: str

    async def scrape(self) -> bytes: ...


class LocalMetrics:
    """One process's metrics: the in-process server's ``GET /metrics`` (its own recorder plus each ``sources`` snapshot:
    the scoring cores', the reward telemetry)."""

    def __init__(self) -> None:
        self.recorder = MetricsRecorder()
        self.recorder.set("gateway_replicas", 1)
        self.content_type = CONTENT_TYPE
        self.sources: list[Callable[[], Snapshot]] = []

    async def scrape(self) -> bytes:
        return render(merge([self.recorder.snapshot(), *(source() for source in self.sources)]))
