"""`rmserve score`, `rmserve train` and `rmserve demo` as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rmserve.model.synthetic import make_preference_pairs


def rmserve(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "rmserve.serve.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_score_file_matches_python_api(tmp_path, demo_model_dir, demo_model):
    items = [
        {"id": "a", "prompt": "Tell me about owls.", "response": "Gladly! Owls have a long history."},
        {"prompt": "Tell me about owls.", "response": "Go away."},
        {"text": "Bees change with the seasons."},
        {"messages": [{"role": "user", "content": "Tea?"}, {"role": "assistant", "content": "Of course."}]},
    ]
    src = tmp_path / "items.jsonl"
    src.write_text("\n".join(json.dumps(it) for it in items) + "\n")
    out = tmp_path / "rewards.jsonl"
    proc = rmserve(
        "score", "--model", str(demo_model_dir), "--dtype", "fp32", "--input", str(src), "--output", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = demo_model.score([{k: v for k, v in it.items() if k != "id"} for it in items])
    assert [r["reward"] for r in rows] == pytest.approx(want, abs=1e-5)
    assert rows[0]["id"] == "a" and "id" not in rows[1]
    assert all(r["truncated"] is False for r in rows)


def test_score_reports_bad_lines_with_numbers_and_exit_2(tmp_path, demo_model_dir):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(
        b'\xef\xbb\xbf{"prompt": "Hi", "response": "Hello"}\n'  # a file saved with a UTF-8 BOM: line 1 is fine
        b"{not json\n"
        b'{"prompt": "Hi"}\n'
        b'{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'
        b'{"prompt": "Hi", "response": "caf\xe9"}\n'  # Latin-1, not UTF-8: that line, not the whole file
        b'{"prompt": "Hi", "response": ""}\n'  # an empty response is scored
    )
    out = tmp_path / "out.jsonl"
    proc = rmserve("score", "--model", str(demo_model_dir), "--input", str(src), "--output", str(out))
    assert proc.returncode == 2
    for n in (2, 3, 4, 5):
        assert f"line {n}:" in proc.stderr
    assert "line 5: not valid UTF-8" in proc.stderr and "line 6:" not in proc.stderr
    assert "reading: 100%" in proc.stderr  # the bar of the tokenizing pass
    assert "line 1:" not in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_score_missing_input_and_bad_model(tmp_path):
    proc = rmserve("score", "--input", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o.jsonl"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    src = tmp_path / "i.jsonl"
    src.write_text('{"text": "x"}\n')
    proc = rmserve("score", "--model", str(tmp_path / "nomodel"), "--input", str(src), "--output", str(tmp_path / "o"))
    assert proc.returncode in (1, 2) and "not a directory" in proc.stderr and "Traceback" not in proc.stderr


def test_score_reads_the_same_config_sources_as_serve(tmp_path, demo_model_dir, demo_model):
    # A server's YAML file (with server-only keys too) configures the model; RMSERVE_* variables and flags apply.
    config = tmp_path / "prod.yaml"
    config.write_text(f"model: {{path: {demo_model_dir}, dtype: fp32}}\nbatching: {{max_batch_tokens: 64}}\nport: 91\n")
    items = [{"prompt": "Tell me about owls.", "response": "Gladly! Owls have a long history."}, {"text": "Tea."}]
    src, out = tmp_path / "items.jsonl", tmp_path / "rewards.jsonl"
    src.write_text("\n".join(json.dumps(it) for it in items) + "\n")
    args = ["score", "--config", str(config), "--input", str(src), "--output", str(out)]
    proc = rmserve(*args)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["reward"] for line in out.read_text().splitlines()] == pytest.approx(
        demo_model.score(items), abs=1e-5
    )
    env = dict(os.environ, PYTHONWARNINGS="ignore", RMSERVE_BATCHING__MAX_BATCH_TOKENS="lots")
    bad = subprocess.run(
        [sys.executable, "-m", "rmserve.serve.cli.main", *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert bad.returncode == 2 and "batching.max_batch_tokens (from environment)" in bad.stderr, bad.stderr
    proc = rmserve(*args, "--template", "nonsense")
    assert proc.returncode == 2 and "--template" in proc.stderr


def test_train_writes_a_loadable_checkpoint(tmp_path):
    data = tmp_path / "prefs.jsonl"
    pairs = make_preference_pairs(120, seed=9)
    data.write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    out = tmp_path / "rm"
    proc = rmserve("train", "--data", str(data), "--out", str(out), "--steps", "60", "--hidden-size", "32")
    assert proc.returncode == 0, proc.stderr
    assert "held-out pairwise accuracy" in proc.stdout

    from rmserve.model import load_reward_model

    rm = load_reward_model(str(out), device="cpu", dtype="fp32")
    assert rm.head_name == "reward_head" and len(rm.score([{"prompt": "Hi", "response": "Hello"}])) == 1


def test_train_rejects_bad_lines(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    proc = rmserve("train", "--data", str(data), "--out", str(tmp_path / "rm"))
    assert proc.returncode == 2 and "line 2" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_prints_accuracy(demo_model_dir):
    proc = rmserve("demo", "--out", str(demo_model_dir.parent))
    assert proc.returncode == 0, proc.stderr
    accuracy = float(proc.stdout.split("held-out pairwise accuracy:")[1].split()[0])
    assert accuracy >= 0.90 and str(demo_model_dir) in proc.stdout
