"""The GPU pass's pure parts: how rmserve is started without its console script, the ``--model`` plans and server
sets (``--runtime inprocess``, prefix sharing on and off), the ratios against the baseline and the engine alone, the
engine's items, and the Qwen3-0.6B shape.

No servers, no GPU: configs on the meta device, hand-made points.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from rmserve.benchmarks.launch import RMSERVE_CLI_MODULE, resolve_rmserve_executable
from rmserve.benchmarks.models import CONFIGS, FAMILIES, model_config
from rmserve.benchmarks.scenarios import build_requests, scenario_plan
from rmserve.benchmarks.server import (
    ENGINE_MAX_ITEMS,
    MODEL_PLANS,
    PPO_300,
    engine_items,
    model_plan,
    model_ratios,
    model_specs,
    server_specs,
    uses_model_specs,
)
from rmserve.benchmarks.workloads import PPO_FULL, ppo_prompt_response_lengths

ROOT = Path(__file__).resolve().parents[3]


# -- starting rmserve ---------------------------------------------------------------------------------
def test_the_script_next_to_the_interpreter_comes_first(tmp_path):
    (tmp_path / "rmserve").write_text("#!/bin/sh\n")
    python = tmp_path / "python"
    assert resolve_rmserve_executable(python, "/usr/bin/rmserve") == [str(tmp_path / "rmserve")]


def test_without_a_script_the_interpreter_runs_the_cli_module(tmp_path):
    python = tmp_path / "python"
    assert resolve_rmserve_executable(python, "/opt/bin/rmserve") == ["/opt/bin/rmserve"]
    assert resolve_rmserve_executable(python, None) == [str(python), "-m", RMSERVE_CLI_MODULE]


# -- plans and servers --------------------------------------------------------------------------------
def test_the_default_plan_and_the_cpu_plan_are_unchanged():
    assert model_plan(None) == scenario_plan(False)
    assert model_plan(None, "default", True) == scenario_plan(True)
    assert model_plan("/ckpt", "default") == scenario_plan(False, "/ckpt")
    assert not uses_model_specs(None, "default", "ray")
    assert not uses_model_specs("/ckpt", "default", "ray")  # --model alone: server_specs, as before
    assert uses_model_specs("/ckpt", "default", "inprocess")
    assert uses_model_specs("/ckpt", "ppo-300", "ray")


def test_the_gpu_plans():
    grpo = model_plan("/ckpt", "ppo-grpo")
    assert [(s.workload, s.concurrencies, s.n_requests) for s in grpo] == [
        ("ppo-single", (64,), 192),
        ("grpo-per-sample", (64,), 128),
    ]
    assert grpo[0].ppo_shape == PPO_FULL
    (short,) = model_plan("/ckpt", "ppo-300")
    assert (short.workload, short.concurrencies, short.ppo_shape) == ("ppo-single", (64, 128), PPO_300)
    quick = model_plan("/ckpt", "ppo-300", quick=True)[0]
    assert quick.n_requests < short.n_requests and quick.max_seconds < short.max_seconds
    assert set(MODEL_PLANS) == {"default", "ppo-grpo", "ppo-300"}
    with pytest.raises(ValueError, match="unknown plan"):
        model_plan("/ckpt", "nope")


def test_ppo_300_items_are_about_300_tokens():
    totals = sorted(p + r for p, r in ppo_prompt_response_lengths(2000, PPO_300, seed=0))
    assert 270 <= totals[len(totals) // 2] <= 330
    assert max(totals) <= PPO_300.max_total


def test_inprocess_servers_with_prefix_sharing_on_and_off():
    specs = model_specs("inprocess", prefix_compare=True)
    assert [s.name for s in specs] == ["rmserve-inprocess", "rmserve-inprocess-noshare", "baseline"]
    on, off, baseline = specs
    assert on.args == ("--runtime", "inprocess") and on.workloads is None
    assert off.args == ("--runtime", "inprocess", "--prefix-sharing", "off", "--prefix-cache-bytes", "0")
    assert off.workloads == ("grpo-per-sample",) and off.optional
    assert baseline.kind == "baseline" and baseline.env == {}  # at its defaults on a GPU
    command = on.command("/ckpt", 8123, "bf16")
    assert command[-4:] == ["--dtype", "bf16", "--runtime", "inprocess"] and "serve" in command
    assert [s.name for s in model_specs("ray")] == ["rmserve", "baseline"]
    assert model_specs("ray")[0].args == ()
    with pytest.raises(ValueError, match="unknown runtime"):
        model_specs("threads")


def test_the_cpu_server_sets_still_pin_one_thread():
    assert [s.name for s in server_specs("/ckpt", True, False)] == ["baseline", "rmserve"]
    assert server_specs("/ckpt", True, False)[1].args == ("--num-cpus", "1")


# -- the engine's items and the ratios ----------------------------------------------------------------
def test_the_engine_scores_the_items_the_servers_measure():
    scenario = model_plan("/ckpt", "ppo-grpo")[0]
    items = engine_items(scenario, 0, vocab=1000)
    sent = build_requests("ppo-single", "baseline", vocab_size=1000, n_requests=scenario.n_requests,
                          ppo_shape=scenario.ppo_shape, seed=1)  # fmt: skip
    warmup = min(4, len(sent) // 8)
    assert items == [r.body["items"][0]["input_ids"] for r in sent[warmup:]]
    assert len(engine_items(model_plan("/ckpt", "ppo-300")[0], 1, vocab=1000)) == ENGINE_MAX_ITEMS


def point(server: str, workload: str, items_per_s: float, concurrency: int = 64, ratio=None) -> dict:
    return {"model": "/ckpt", "workload": workload, "concurrency": concurrency, "server": server,
            "items_per_s": items_per_s, "computed_over_received": ratio}  # fmt: skip


def test_ratios_against_the_baseline_the_unshared_twin_and_the_engine():
    points = [
        point("rmserve-inprocess", "ppo-single", 90.0, ratio=1.0),
        point("baseline", "ppo-single", 30.0),
        point("rmserve-inprocess", "grpo-per-sample", 60.0, ratio=0.3),
        point("rmserve-inprocess-noshare", "grpo-per-sample", 20.0, ratio=1.0),
        point("baseline", "grpo-per-sample", 15.0),
    ]
    engine = [{"model": "/ckpt", "workload": "ppo-single", "concurrency": 64, "items_per_s": 100.0,
               "batches_items_per_s": 95.0}]  # fmt: skip
    rows = {(r["workload"], r["server"], r["against"]): r for r in model_ratios(points, engine)}
    assert rows[("ppo-single", "rmserve-inprocess", "baseline")]["speedup"] == pytest.approx(3.0)
    assert rows[("ppo-single", "rmserve-inprocess", "engine")]["speedup"] == pytest.approx(0.9)
    assert rows[("ppo-single", "rmserve-inprocess", "engine-batches")]["speedup"] == pytest.approx(90 / 95)
    share = rows[("grpo-per-sample", "rmserve-inprocess", "rmserve-inprocess-noshare")]
    assert share["speedup"] == pytest.approx(3.0) and share["computed_over_received"] == 0.3
    assert rows[("grpo-per-sample", "rmserve-inprocess-noshare", "baseline")]["speedup"] == pytest.approx(20 / 15)
    assert len(rows) == 6  # nothing against itself, no engine row for GRPO, the baseline against nothing


# -- the Qwen3-0.6B shape -----------------------------------------------------------------------------
def test_the_qwen3_shape():
    from transformers import AutoModelForSequenceClassification

    assert FAMILIES["Qwen3-0.6B-shape"] == "qwen3"
    config = model_config("Qwen3-0.6B-shape", num_labels=1)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1024, 28, 16)
    assert (config.num_key_value_heads, config.intermediate_size, config.vocab_size) == (8, 3072, 151936)
    assert config.tie_word_embeddings
    if config.model_type == "qwen3":
        assert config.head_dim == 128
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    assert type(model).__name__ == f"{config.model_type.capitalize()}ForSequenceClassification"
    total = sum(p.numel() for p in model.parameters())
    assert 0.55e9 < total < 0.65e9  # Qwen3-0.6B: 0.6B with its tied embedding


def test_fewer_layers_keep_the_width():
    config = model_config("8B-shape", layers=4)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (4, 4096, 128256)
    assert CONFIGS["8B-shape"]["num_hidden_layers"] == 32


def test_the_gpu_pass_script_parses():
    done = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_pass.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
