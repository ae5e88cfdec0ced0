"""Issue 12: `rmserve score` with several models and an ensemble writes each model's and each ensemble's reward;
`rmserve serve` refuses an ensemble whose member has no normalisation statistics, naming both, before Ray starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rmserve.model import load_reward_model

STATS = {"a": (0.5, 2.0), "b": (-0.25, 0.5)}


def rmserve(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "rmserve.serve.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_score_with_two_models_and_an_ensemble(tmp_path, checkpoint_factory):
    a, _, _ = checkpoint_factory("score", mean=STATS["a"][0], std=STATS["a"][1])
    b, _, _ = checkpoint_factory("score", seed=1, mean=STATS["b"][0], std=STATS["b"][1])
    items = [{"id": k, "prompt": f"Question {k}?", "response": "Yes. " * (k + 1)} for k in range(5)]
    src = tmp_path / "items.jsonl"
    src.write_text("\n".join(json.dumps(it) for it in items) + "\n")
    config = tmp_path / "models.yaml"
    config.write_text(
        "model: {dtype: fp32, device: cpu}\n"
        f"models: [{{name: a, path: '{a}'}}, {{name: b, path: '{b}'}}]\n"
        "ensembles: [{name: both, members: {a: 1.0, b: 3.0}, combine: mean_minus_std, lambda: 0.5}]\n"
    )
    out = tmp_path / "rewards.jsonl"
    proc = rmserve("score", "--config", str(config), "--input", str(src), "--output", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    plain = [{k: v for k, v in it.items() if k != "id"} for it in items]
    raw = {name: np.array(load_reward_model(str(path), dtype="fp32", device="cpu").score(plain)) for name, path in
           (("a", a), ("b", b))}  # fmt: skip
    z = {name: (raw[name] - STATS[name][0]) / STATS[name][1] for name in raw}
    mu = (z["a"] + 3 * z["b"]) / 4
    sigma = np.sqrt((((z["a"] - mu) ** 2) + 3 * (z["b"] - mu) ** 2) / 4)
    assert [r["id"] for r in rows] == list(range(5))
    assert [r["reward"] for r in rows] == pytest.approx(list(raw["a"]), abs=1e-5)  # the first model
    assert [r["rewards"]["b"] for r in rows] == pytest.approx(list(raw["b"]), abs=1e-5)
    assert [r["ensembles"]["both"]["reward"] for r in rows] == pytest.approx(list(mu - 0.5 * sigma), abs=1e-5)
    assert [r["ensembles"]["both"]["spread"] for r in rows] == pytest.approx(list(sigma), abs=1e-5)
    assert [r["ensembles"]["both"]["members"]["a"] for r in rows] == pytest.approx(list(z["a"]), abs=1e-5)


def test_serve_refuses_an_ensemble_member_without_statistics(tmp_path, checkpoint_factory):
    a, _, _ = checkpoint_factory("score", mean=STATS["a"][0], std=STATS["a"][1])
    bare, _, _ = checkpoint_factory("score", seed=2)
    config = tmp_path / "models.yaml"
    config.write_text(
        f"models: [{{name: a, path: '{a}'}}, {{name: bare, path: '{bare}'}}]\n"
        "ensembles: [{name: both, members: {a: 1.0, bare: 1.0}}]\n"
    )
    proc = rmserve("serve", "--config", str(config), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "'both'" in proc.stderr and "member 'bare'" in proc.stderr and "normalisation statistics" in proc.stderr
    assert "Traceback" not in proc.stderr
