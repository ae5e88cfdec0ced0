"""The ensemble benchmark's pure parts (benchmarks/ensemble.py): its plan and arguments, the configs it starts the
servers with (checked by the server's own config validation and start-up check), the resources each setup gets, and
the client-side combination, worked out by hand. No Ray, no network, no timing."""

from __future__ import annotations

import pytest

from rmserve.benchmarks.ensemble import (
    APP,
    ENSEMBLE,
    MEMBER_STATS,
    SEPARATE,
    app_config,
    combine_members,
    describe_resources,
    ensemble_plan,
    member_config,
    parse_args,
    resource_plans,
    scorer_cpus,
    side_by_side,
    with_model,
)
from rmserve.benchmarks.loadgen import BenchRequest
from rmserve.serve.config.loading import load_config
from rmserve.serve.routing.ensemble import check_ensemble_members


def test_arguments_and_plans():
    quick = parse_args(["--quick"])
    assert quick.quick and quick.models is None and quick.repeats is None
    (scenario,) = ensemble_plan(quick.quick, quick.models)
    assert (scenario.model, scenario.workload, scenario.concurrencies) == ("demo", "ppo-single", (64,))
    full = ensemble_plan(False)
    assert [s.model for s in full] == ["demo", "bench-20M"]
    assert all(s.workload == "ppo-single" and s.concurrencies == (64,) for s in full)
    assert all(
        f.n_requests > q.n_requests for f, q in zip(full, ensemble_plan(True, ("demo", "bench-20M")), strict=True)
    )
    chosen = parse_args(["--models", "bench-20M", "--repeats", "3", "--dtype", "bf16"])
    assert (chosen.models, chosen.repeats, chosen.dtype) == (("bench-20M",), 3, "bf16")


@pytest.mark.parametrize("argv", [["--models", "8B-shape"], ["--models", ","], ["--repeats", "0"]])
def test_bad_arguments_name_the_flag(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert argv[0] in capsys.readouterr().err


def test_the_app_config_serves_both_members_with_statistics_and_the_ensemble():
    config = load_config(base=app_config("/ckpt/rm"))
    assert [(m.name, m.path, m.reward_mean, m.reward_std) for m in config.models] == [
        ("a", "/ckpt/rm", 0.0, 1.0),
        ("b", "/ckpt/rm", 0.5, 2.0),
    ]
    assert config.ensembles == [ENSEMBLE]
    check_ensemble_members(config)  # what `rmserve serve` checks at start-up: every member has statistics
    for member, (mean, std) in MEMBER_STATS.items():
        single = load_config(base=member_config("/ckpt/rm", member))
        assert (single.model.path, single.model.reward_mean, single.model.reward_std) == ("/ckpt/rm", mean, std)
        assert single.models == [] and single.ensembles == []


def test_defaults_first_then_each_separate_server_gets_the_apps_share():
    defaults, equal = resource_plans(2)
    assert (defaults.name, defaults.app_cpus, defaults.separate_cpus) == ("defaults", None, None)
    # On 2 cores the app's Gateway keeps 0.25 and its two Scorers share 1.75 (rounded down to 1/100 CPU) ...
    assert scorer_cpus(app_config("."), 2) == 0.87
    # ... while a server of its own gives its one Scorer 1.75.
    assert scorer_cpus(member_config(".", "a"), 2) == 1.75
    assert (equal.name, equal.app_cpus, equal.separate_cpus) == ("equal", None, 0.87)
    assert scorer_cpus(member_config(".", "a", equal.separate_cpus), 2) == 0.87
    described = describe_resources(equal, 2)
    assert "2 Scorers x 0.87 CPUs, 1 torch thread(s) each" in described[APP]
    assert "1 Scorer x 0.87 CPUs, 1 torch thread(s) each; 2 Gateways" in described[SEPARATE]
    assert "1 Scorer x 1.75 CPUs" in describe_resources(defaults, 2)[SEPARATE]
    assert resource_plans(16)[1].separate_cpus == 7.87  # (16 - 0.25) / 2, rounded down


def test_the_client_side_combination_by_hand():
    # a: mean 0, std 1 -> z_a = 1.0; b: mean 0.5, std 2 -> z_b = (4.5 - 0.5) / 2 = 2.0.
    # Equal weights: mu = 1.5, sigma = 0.5; mean_minus_std with lambda 0.5 -> 1.5 - 0.25 = 1.25.
    combined = combine_members({"a": [1.0, 0.0], "b": [4.5, 0.5]})
    assert combined.members == {"a": [1.0, 0.0], "b": [2.0, 0.0]}
    assert combined.spread == pytest.approx([0.5, 0.0], abs=1e-12)
    assert combined.rewards == pytest.approx([1.25, 0.0], abs=1e-12)


def test_with_model_names_the_ensemble_and_leaves_the_originals():
    original = [BenchRequest("/v1/score", {"items": [{"input_ids": [5, 6]}]}, 1)]
    (named,) = with_model(original, "ens")
    assert named.body == {"items": [{"input_ids": [5, 6]}], "model": "ens"} and named.items == 1
    assert original[0].body == {"items": [{"input_ids": [5, 6]}]}


def test_side_by_side_puts_both_setups_in_one_table_with_their_ratio():
    def row(setup: str, items_per_s: float) -> dict:
        return {"model": "demo", "resources": "defaults", "concurrency": 64, "server": setup,
                "items_per_s": items_per_s, "p50_ms": 100.0, "p99_ms": 250.0, "requests_failed": 0,
                "server_cpu_ms_per_item": 3.0, "max_abs_diff": 2e-7}  # fmt: skip

    lines = side_by_side([row(APP, 30.0), row(SEPARATE, 20.0)], {"defaults": {APP: "app CPUs", SEPARATE: "own CPUs"}})
    assert len(lines) == 4 and "one app ÷ two servers" in lines[0]
    app_cells = [c.strip() for c in lines[2].split("|")]
    separate_cells = [c.strip() for c in lines[3].split("|")]
    assert app_cells[4:10] == [APP, "app CPUs", "30.0", "100.0", "250.0", "0"] and "1.50x" in app_cells
    assert separate_cells[4:6] == [SEPARATE, "own CPUs"] and "1.50x" not in separate_cells
