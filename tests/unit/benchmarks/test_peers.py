"""The peer comparison's pure parts: CPU accounting from /proc, the peer's command line and setup lookup, the
query workloads and their requests, the server sets, reward agreement and the ratios.

No servers, no network, no OpenRLHF: fake /proc lines, a fake tokenizer, hand-made points.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rmserve.benchmarks.launch import (
    OPENRLHF_PYTHON_ENV,
    OPENRLHF_PYTHONPATH_ENV,
    OpenRLHFSetup,
    ProcStat,
    help_offers_runtime,
    openrlhf_command,
    read_proc_table,
    resolve_openrlhf_setup,
    server_pids,
    setup_script_location,
    tree_cpu_ticks,
)
from rmserve.benchmarks.loadgen import LoadResult
from rmserve.benchmarks.models import CONFIGS, llama_config
from rmserve.benchmarks.report import reward_markdown, server_markdown
from rmserve.benchmarks.scenarios import (
    QUERY_WORKLOADS,
    QueryFormat,
    build_requests,
    peer_plan,
    query_request,
    query_samples,
)
from rmserve.benchmarks.server import (
    check_samples,
    compare_rewards,
    count_points,
    cpu_ms_per_item,
    first_reward,
    peer_ratios,
    peer_spec_sets,
    peer_specs,
    relative_diff,
    reward_lines,
    select_plan,
    select_specs,
    variant_of,
)
from rmserve.benchmarks.workloads import BEST_OF_16, GRPO_SHARED, interleaved_samples, ppo_text_items


# -- CPU accounting ---------------------------------------------------------------------------------
def stat_line(pid: int, ppid: int, session: int, utime: int, stime: int, cutime: int = 0, cstime: int = 0,
              comm: str = "python") -> str:  # fmt: skip
    """A /proc/<pid>/stat line: pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    utime stime cutime cstime ..."""
    return (f"{pid} ({comm}) S {ppid} {pid} {session} 0 -1 4194304 100 0 0 0 "
            f"{utime} {stime} {cutime} {cstime} 20 0 1 0 12345 0 0")  # fmt: skip


def test_a_stat_line_parses_even_with_spaces_and_parentheses_in_the_name():
    stat = ProcStat.parse(stat_line(42, 7, 7, 100, 20, 5, 3, comm="ray::Serve Replica (x)"))
    assert stat == ProcStat(pid=42, ppid=7, session=7, own_ticks=120, reaped_children_ticks=8)


def table(*lines: str) -> dict[int, ProcStat]:
    return {s.pid: s for s in map(ProcStat.parse, lines)}


def test_the_server_is_its_tree_and_its_session_and_nothing_else():
    procs = table(
        stat_line(100, 1, 100, 10, 1),  # the server, session leader (start_new_session)
        stat_line(101, 100, 100, 20, 2),  # a child (raylet)
        stat_line(102, 101, 100, 30, 3),  # a grandchild (a replica)
        stat_line(103, 1, 100, 4, 0),  # a daemon of its session adopted by init
        stat_line(200, 1, 200, 999, 99),  # another program
        stat_line(201, 200, 200, 999, 99),
    )
    assert sorted(server_pids(100, procs)) == [100, 101, 102, 103]
    assert tree_cpu_ticks(100, procs) == 11 + 22 + 33 + 4
    assert server_pids(999, procs) == []  # gone


def test_a_child_that_exits_keeps_counting_in_its_parent():
    before = table(stat_line(100, 1, 100, 10, 0), stat_line(101, 100, 100, 50, 0))
    # 101 ran 20 more ticks, exited and was reaped: its 70 ticks are now in 100's cutime
    after = table(stat_line(100, 1, 100, 12, 0, cutime=70))
    assert tree_cpu_ticks(100, after) - tree_cpu_ticks(100, before) == 2 + 20


def test_the_proc_table_reads_a_directory_and_skips_what_is_not_a_process(tmp_path: Path):
    for pid, line in {5: stat_line(5, 1, 5, 3, 4), 6: stat_line(6, 5, 5, 1, 1)}.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(line)
    (tmp_path / "7").mkdir()  # vanished before its stat was read
    (tmp_path / "self").mkdir()
    procs = read_proc_table(tmp_path)
    assert set(procs) == {5, 6} and tree_cpu_ticks(5, procs) == 9


def test_cpu_per_item_counts_the_warm_up_items_the_window_also_holds():
    point = LoadResult(server="s", workload="w", concurrency=64, items_ok=96, warmup_items=4)
    assert cpu_ms_per_item(2.0, point) == pytest.approx(20.0)
    assert cpu_ms_per_item(1.0, LoadResult(server="s", workload="w", concurrency=1)) == 1000.0  # nothing answered


# -- the peer's command line and setup ---------------------------------------------------------------
def test_the_peer_command_line_is_serve_rm_at_its_defaults_but_attention_and_dtype():
    command = openrlhf_command("/v/bin/python", "/ckpt", 8123, "bf16")
    assert command == ["/v/bin/python", "-m", "openrlhf.cli.serve_rm", "--reward.model_name_or_path", "/ckpt",
                       "--ds.attn_implementation", "sdpa", "--ds.param_dtype", "bf16", "--port", "8123",
                       "--host", "127.0.0.1"]  # fmt: skip
    assert "flash_attention_2" in openrlhf_command("p", "/c", 1, "fp16", attn="flash_attention_2")
    with pytest.raises(ValueError, match="bf16 or fp16"):
        openrlhf_command("p", "/c", 1, "fp32")


def test_the_peer_setup_comes_from_flags_then_environment_then_the_scripts_location(tmp_path: Path):
    python, path = setup_script_location(str(tmp_path))
    assert python == f"{tmp_path}/orlhf-venv/bin/python" and path == f"{tmp_path}/orlhf-stubs:{tmp_path}/orlhf-src"
    env = {OPENRLHF_PYTHON_ENV: "/env/python", OPENRLHF_PYTHONPATH_ENV: "/env/stubs:/env/src"}
    assert resolve_openrlhf_setup("/flag/python", "/flag/path", env, (python, path)) == (
        "/flag/python", "/flag/path", "flag")  # fmt: skip
    assert resolve_openrlhf_setup(None, None, env, (python, path)) == ("/env/python", "/env/stubs:/env/src",
                                                                       "environment")  # fmt: skip
    assert resolve_openrlhf_setup(None, None, {}, (python, path)) is None  # nothing set up there
    Path(python).parent.mkdir(parents=True)
    Path(python).touch()
    assert resolve_openrlhf_setup(None, None, {}, (python, path)) == (python, path, "default location")
    assert OpenRLHFSetup("/p", "/a:/b").env() == {"PYTHONPATH": "/a:/b"}


def test_the_runtime_probe_reads_rmserve_serve_help():
    assert help_offers_runtime("  --runtime {ray,inprocess}\n   What runs the server", "inprocess")
    assert not help_offers_runtime("  --runtime {ray}\n", "inprocess")
    assert not help_offers_runtime("  --ingress {auto,direct,proxy}\n  inprocess mentioned elsewhere", "inprocess")
    assert not help_offers_runtime(None, "inprocess")


# -- models and workloads ----------------------------------------------------------------------------
def test_the_tiny_model_is_one_layer_of_width_64():
    config = llama_config("tiny-1L")
    assert (config.num_hidden_layers, config.hidden_size) == (1, 64)
    assert CONFIGS["tiny-1L"]["vocab_size"] == 768  # the demo tokenizer's


class FakeTokenizer:
    """Adds BOS (id 1) in front like LLaMA's; one id per word."""

    bos_token, eos_token, bos_token_id = "<s>", "</s>", 1

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [len(w) + 2 for w in text.split()]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_queries_are_formatted_as_openrlhf_sends_them_and_the_baseline_gets_no_second_bos():
    fmt = QueryFormat.from_tokenizer(FakeTokenizer())
    assert fmt == QueryFormat(bos="<s>", eos="</s>", adds_bos=True)
    text = fmt.query({"prompt": "2+2?", "response": "4"})
    assert text == "<s>2+2?\n4</s>"
    assert query_request(text, "openrlhf", fmt).path == "/get_reward"
    assert query_request(text, "rmserve", fmt).body == {"query": ["<s>2+2?\n4</s>"]}
    baseline = query_request(text, "baseline", fmt)
    assert (baseline.path, baseline.body) == ("/v1/score", {"items": [{"text": "2+2?\n4</s>"}]})
    assert QueryFormat(bos="<s>", adds_bos=False).without_added_bos(text) == text


def test_query_workloads_have_their_shapes_one_sample_a_request_groups_interleaved():
    ppo = query_samples("ppo-query", 50, seed=3)
    assert len(ppo) == 50 and ppo == ppo_text_items(50, seed=3) and len({s["prompt"] for s in ppo}) == 50
    grpo = query_samples("grpo-query", 64, seed=0)
    assert len(grpo) == 64 and len({s["prompt"] for s in grpo}) == 64 // GRPO_SHARED.n
    assert len({s["prompt"] for s in grpo[:8]}) == 8  # the first request of every group first
    best = query_samples("best-of-16-query", 64, seed=0)
    assert len(best) == 64 and len({s["prompt"] for s in best}) == 64 // BEST_OF_16.n
    assert query_samples("best-of-16-query", 8, seed=0) == query_samples("best-of-16-query", 16, seed=0)  # one group
    assert query_samples("grpo-query", 64, seed=1) != grpo  # fresh items for another repeat
    for workload in QUERY_WORKLOADS:
        requests = build_requests(workload, "openrlhf", vocab_size=768, n_requests=32, fmt=QueryFormat("<s>", "</s>"))
        assert all(r.items == 1 and len(r.body["query"]) == 1 for r in requests)
    with pytest.raises(ValueError, match="query workloads"):
        build_requests("ppo-single", "openrlhf", vocab_size=768, n_requests=4)


def test_ppo_text_is_about_200_tokens_and_groups_interleave():
    lengths = sorted(len(s["prompt"].split()) + len(s["response"].split()) for s in ppo_text_items(400, seed=0))
    assert 60 <= lengths[len(lengths) // 2] <= 90  # ≈ 200 tokens at 2.77 tokens a word
    groups = [{"prompt": "a", "responses": ["1", "2"]}, {"prompt": "b", "responses": ["3", "4"]}]
    assert [s["response"] for s in interleaved_samples(groups)] == ["1", "3", "2", "4"]


# -- servers of the comparison -------------------------------------------------------------------------
SETUP = OpenRLHFSetup("/v/bin/python", "/s:/src")


def test_peer_specs_at_defaults_and_at_one_thread():
    specs, notes = peer_specs(SETUP, dtype="bf16", inprocess=True)
    names = ["openrlhf", "rmserve", "rmserve-inprocess", "rmserve-inprocess-eager", "baseline"]
    assert [s.name for s in specs] == names and notes == []
    assert specs[3].args == ("--runtime", "inprocess", "--compile", "off")
    peer = specs[0]
    assert peer.command("/c", 9, "bf16")[:3] == ["/v/bin/python", "-m", "openrlhf.cli.serve_rm"]
    assert peer.env == {"PYTHONPATH": "/s:/src"} and peer.probe.path == "/get_reward" and peer.optional
    assert specs[2].command("/c", 9, "bf16")[-2:] == ["--runtime", "inprocess"] and specs[1].probe.path == "/ready"
    one, _ = peer_specs(SETUP, dtype="bf16", inprocess=True, threads="one")
    assert [s.name for s in one] == ["openrlhf-1t", "rmserve-1t", "rmserve-inprocess-1t", "baseline-1t"]
    assert one[0].env == {"PYTHONPATH": "/s:/src", "OMP_NUM_THREADS": "1"} and one[3].env == {"OMP_NUM_THREADS": "1"}
    assert one[1].args == ("--num-cpus", "1") and one[2].args == ("--runtime", "inprocess", "--num-cpus", "1")


def test_what_cannot_run_is_left_out_with_a_note():
    specs, notes = peer_specs(None, dtype="bf16", inprocess=False)
    assert [s.name for s in specs] == ["rmserve", "baseline"]
    assert any("inprocess" in n for n in notes)
    specs, notes = peer_specs(SETUP, dtype="fp32", inprocess=True)
    assert "openrlhf" not in [s.name for s in specs] and any("bf16 or fp16" in n for n in notes)
    with pytest.raises(ValueError, match="threads"):
        peer_specs(SETUP, dtype="bf16", inprocess=True, threads="two")


def test_spec_sets_run_one_after_the_other_and_count_their_points():
    sets, _ = peer_spec_sets(SETUP, dtype="bf16", quick=False, with_rmserve=True, inprocess=True)
    assert [[s.name for s in specs] for specs in sets][1][0] == "openrlhf-1t"
    quick, _ = peer_spec_sets(SETUP, dtype="bf16", quick=True, with_rmserve=True, inprocess=False)
    assert len(quick) == 1 and len(quick[0]) == 3
    assert count_points(True, True, spec_sets=quick, plan=peer_plan(True)) == 4 * 3
    assert count_points(False, True, spec_sets=sets, plan=peer_plan(False)) == 4 * 9


def test_filters_pick_servers_by_name_or_variant_and_scenarios_by_model_and_workload():
    specs, _ = peer_specs(SETUP, dtype="bf16", inprocess=True, threads="one")
    assert [s.name for s in select_specs(specs, ["openrlhf", "rmserve-1t"])] == ["openrlhf-1t", "rmserve-1t"]
    assert select_specs(specs, None) == specs
    with pytest.raises(ValueError, match="vllm"):
        select_specs(specs, ["vllm"])
    # a server only the defaults set has (the eager in-process runtime) leaves the one-thread set without it
    assert [s.name for s in select_specs(specs, ["rmserve-inprocess-eager", "rmserve"], strict=False)] == ["rmserve-1t"]
    assert variant_of("rmserve-inprocess-1t") == ("rmserve-inprocess", "-1t") and variant_of("x") == ("x", "")
    plan = select_plan(peer_plan(True), ["tiny-1L"], ["ppo-query"])
    assert [(s.model, s.workload, s.concurrencies) for s in plan] == [("tiny-1L", "ppo-query", (64,))]
    assert all(s.concurrencies == (64,) for s in peer_plan(False))


# -- rewards and ratios --------------------------------------------------------------------------------
def test_rewards_agree_within_a_share_of_their_size_and_spread():
    rewards = {"openrlhf": [1.0, -1.0, 3.0, -3.0], "rmserve": [1.05, -1.0, 3.0, -3.1], "bad": [2.0, -1.0, 3.0, -3.0]}
    check = compare_rewards(rewards, "openrlhf", rtol=0.03)  # std of the reference: sqrt(5) ≈ 2.236
    assert check["reward_std"] == pytest.approx(5**0.5) and check["reference"] == "openrlhf"
    mine = check["servers"]["rmserve"]
    assert mine["max_abs_diff"] == pytest.approx(0.1) and mine["agree"]
    assert mine["max_rel_diff"] == pytest.approx(0.1 / (3 + 5**0.5))  # the worst sample: -3.1 against -3
    assert not check["servers"]["bad"]["agree"]  # 1.0 off on a reward of 1 ± 2.2
    # one group's rewards barely spread: a bf16 rounding of a large reward still agrees
    assert compare_rewards({"a": [36.5, 37.5], "b": [36.6, 37.28]}, "a", 0.03)["servers"]["b"]["agree"]
    assert compare_rewards({"a": [0.0], "b": [0.0]}, "a", 0.03)["servers"]["b"]["agree"]
    assert not compare_rewards({"a": [0.0], "b": [0.1]}, "a", 0.03)["servers"]["b"]["agree"]
    assert relative_diff(1.1, 1.0, 1.0) == pytest.approx(0.05)
    assert first_reward({"rewards": [0.25], "scores": [0.25]}) == 0.25


def test_the_check_takes_two_samples_from_each_of_several_groups():
    samples = check_samples("grpo-query", 8, seed=0)
    assert len(samples) == 8 and len({s["prompt"] for s in samples}) == 4
    assert [s["prompt"] for s in samples[:4]] == [s["prompt"] for s in samples[4:]]  # interleaved
    assert len(check_samples("best-of-16-query", 8, seed=0)) == 8
    assert check_samples("ppo-query", 8, seed=0) == query_samples("ppo-query", 8, seed=0)


def test_reward_tables_show_every_server_side_by_side():
    check = {"model": "tiny-1L", "workload": "ppo-query", "dtype": "bf16", "tokens": [10, 20],
             "rewards": {"openrlhf": [0.5, -0.5], "rmserve": [0.51, -0.49]},
             **compare_rewards({"openrlhf": [0.5, -0.5], "rmserve": [0.51, -0.49]}, "openrlhf", 0.03)}  # fmt: skip
    text = "\n".join(reward_lines(check))
    assert "openrlhf" in text and "0.51000" in text and "rmserve vs openrlhf: max |Δ| 0.01, at most 1.00%" in text
    assert "-> agree (tolerance 3.00%, bf16)" in text
    md = "\n".join(reward_markdown(check))
    assert "| tokens | openrlhf | rmserve |" in md and "| 20 | -0.50000 | -0.49000 |" in md


def point(server: str, items_per_s: float, cpu: float) -> dict:
    return {"model": "tiny-1L", "workload": "ppo-query", "concurrency": 64, "server": server,
            "items_per_s": items_per_s, "server_cpu_ms_per_item": cpu, "p50_ms": 1.0, "p95_ms": 1.0, "p99_ms": 1.0,
            "requests_failed": 0, "load_avg": (1.0, 1.0, 1.0)}  # fmt: skip


def test_peer_ratios_pair_servers_with_the_peer_of_the_same_threads_and_inprocess_with_ray():
    points = [point("openrlhf", 10.0, 40.0), point("rmserve", 100.0, 8.0), point("rmserve-inprocess", 120.0, 4.0),
              point("rmserve-inprocess-eager", 100.0, 5.0), point("openrlhf-1t", 50.0, 10.0),
              point("rmserve-1t", 100.0, 5.0)]  # fmt: skip
    rows = {(r["server"], r["against"]): r for r in peer_ratios(points)}
    assert set(rows) == {("rmserve", "openrlhf"), ("rmserve-inprocess", "openrlhf"), ("rmserve-inprocess", "rmserve"),
                         ("rmserve-inprocess", "rmserve-inprocess-eager"), ("rmserve-inprocess-eager", "openrlhf"),
                         ("rmserve-1t", "openrlhf-1t")}  # fmt: skip
    assert rows[("rmserve-inprocess", "rmserve-inprocess-eager")]["speedup"] == pytest.approx(1.2)
    assert rows[("rmserve", "openrlhf")]["speedup"] == 10.0
    assert rows[("rmserve", "openrlhf")]["cpu_per_item_ratio"] == pytest.approx(0.2)
    assert rows[("rmserve-inprocess", "rmserve")]["speedup"] == pytest.approx(1.2)
    assert rows[("rmserve-1t", "openrlhf-1t")]["speedup"] == 2.0
    md = "\n".join(server_markdown({"repeats": 1, "dtype": "bf16", "points": points, "speedups": peer_ratios(points)},
                                   title="Against OpenRLHF's serve_rm.py"))  # fmt: skip
    assert "## Against OpenRLHF's serve_rm.py (median of 1 interleaved repeats, bf16)" in md
    assert "| tiny-1L | ppo-query | 64 | rmserve | openrlhf | 10.00× | 0.20 |" in md


def test_rmserve_bench_takes_the_peer_section_and_its_flags_but_not_by_default():
    import argparse

    from rmserve.benchmarks.cli import DEFAULT_SECTIONS, SECTIONS, add_bench_args

    parser = argparse.ArgumentParser()
    add_bench_args(parser)
    args = parser.parse_args(["--only", "peers", "--openrlhf-python", "/v/python", "--threads", "one"])
    assert (args.only, args.openrlhf_python, args.threads, args.peers_dtype) == ("peers", "/v/python", "one", "bf16")
    assert "peers" in SECTIONS and "peers" not in DEFAULT_SECTIONS
    assert parser.parse_args([]).only == ",".join(DEFAULT_SECTIONS)
