"""The benchmark report's target verdicts (benchmarks/report.py) on small hand-made results."""

from __future__ import annotations

import pytest

from rmserve.benchmarks.report import evaluate_targets


def results(fp32_tps: float, bf16_tps: float, default: str, overhead_ms: float) -> dict:
    runs = [{"config": "bench-20M", "precision": p, "workload": "ppo", "tokens_per_s": t, "mfu": 0.6}
            for p, t in (("fp32", fp32_tps), ("bf16", bf16_tps))]  # fmt: skip
    return {
        "machine": {"cpu_default_dtype": default},
        "engine": {"runs": runs},
        "server": {"overhead": [{"server": "rmserve", "overhead_ms": overhead_ms}], "speedups": []},
    }


@pytest.mark.parametrize(
    ("fp32_tps", "bf16_tps", "default", "met"),
    [(100, 600, "fp32", False), (600, 100, "fp32", True), (100, 160, "bf16", True), (160, 100, "bf16", False)],
)
def test_cpu_default_dtype_target_asks_that_the_default_be_the_faster(fp32_tps, bf16_tps, default, met):
    row = next(
        r for r in evaluate_targets(results(fp32_tps, bf16_tps, default, 10.0)) if "default dtype" in r["target"]
    )
    assert row["measured"] == pytest.approx(fp32_tps / bf16_tps)
    assert row["met"] is met


def test_unmeasured_targets_are_neither_met_nor_missed_and_overhead_is_an_upper_bound():
    rows = {r["target"]: r for r in evaluate_targets(results(100, 100, "fp32", 15.5))}
    assert rows["demo, short items, 64 clients: rmserve ÷ baseline"]["met"] is None
    assert rows["bench-20M fp32 engine MFU"]["met"] is True
    assert rows["serving overhead, idle p50 − engine (ms)"]["met"] is False
