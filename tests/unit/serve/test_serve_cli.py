"""`rmserve` argument handling that needs no Ray: help, exit codes, one-line errors."""

from __future__ import annotations

import pytest

from rmserve.serve.cli.flags import config_fields, flag_name
from rmserve.serve.cli.main import main


def test_serve_help_documents_every_flag(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per flag, whatever the terminal
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for path, _ in config_fields():
        assert flag_name(path) in out
    for text in ("--config", "RMSERVE_MODEL__PATH", "(default: 8000)", "demo"):
        assert text in out


def test_top_level_help_lists_the_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("serve", "score", "demo", "train", "bench"):
        assert name in out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ([], "required: COMMAND"),
        (["serve", "--port", "abc"], "port (from command line): Input should be a valid integer"),
        (["serve", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["serve", "--dtype", "fp64"], "invalid choice: 'fp64'"),
        (["serve", "--model", "/definitely/not/here"], "is not a directory"),
    ],
)
def test_bad_arguments_exit_2_with_one_error_line(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert "Traceback" not in err
    assert sum(line.startswith("rmserve") and "error:" in line for line in err.splitlines()) == 1


def test_bad_config_file_exits_2(tmp_path, capsys, monkeypatch):
    config = tmp_path / "server.yaml"
    config.write_text("prot: 9000\n")
    monkeypatch.delenv("RMSERVE_CONFIG", raising=False)
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rmserve: error: invalid configuration: unknown key 'prot'") and "\n" not in err


def test_unknown_environment_variable_exits_2(capsys, monkeypatch):
    monkeypatch.setenv("RMSERVE_PROT", "9000")
    assert main(["serve"]) == 2
    assert "unknown environment variable RMSERVE_PROT" in capsys.readouterr().err


def test_a_taken_port_is_reported_before_ray_starts():
    import socket

    from rmserve.serve.cli.process import StartupError, check_port_free

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # free again


def test_deployment_failures_are_cut_to_their_cause():
    from rmserve.serve.rayserve.server import _root_cause

    ray_text = "ray::ProxyActor.ready() (pid=1)\n  File 'proxy.py', line 3\n    raise e\nRuntimeError: Failed to bind\n"
    assert _root_cause(RuntimeError(ray_text)) == "RuntimeError: Failed to bind"
    assert _root_cause(RuntimeError("plain")) == "plain"


def parsed_config(argv: list[str]):
    from rmserve.serve.cli.flags import config_from_args
    from rmserve.serve.cli.main import build_parser

    argv = ["serve", *argv]
    return config_from_args(build_parser(argv).parse_args(argv))


def test_every_flag_accepts_a_value(monkeypatch):
    """Each flag ``--help`` lists takes the text form of its own default (sections as JSON objects)."""
    import json

    from pydantic import BaseModel

    monkeypatch.delenv("RMSERVE_CONFIG", raising=False)
    for path, field in config_fields():
        default = field.get_default(call_default_factory=True)
        flag = flag_name(path)
        if default is None or flag in ("--model", "--api-key"):
            continue
        if isinstance(default, bool):
            argv = [flag if default else "--no-" + flag[2:]]
        elif isinstance(default, BaseModel):
            argv = [flag, json.dumps(default.model_dump(mode="json"))]
        elif isinstance(default, dict):
            argv = [flag, json.dumps(default)]
        elif isinstance(default, list):
            argv = [a for value in default for a in (flag, str(value))]
        else:
            argv = [flag, str(default)]
        parsed_config(argv)  # raises on a flag that rejects its own default


@pytest.mark.parametrize(
    ("argv", "section", "expected"),
    [
        (["--routing", '{"policy": "power_of_two"}'], "routing", {"policy": "power_of_two", "imbalance_items": 256}),
        (["--routing", "policy=power_of_two,imbalance_items=64"], "routing", {"policy": "power_of_two"}),
        (["--autoscaling", "min_replicas=1,max_replicas=4"], "autoscaling", {"min_replicas": 1, "max_replicas": 4}),
        (["--autoscaling", '{"max_replicas": 3, "target_queued_items": 64}'], "autoscaling", {"max_replicas": 3}),
    ],
)
def test_section_flags_take_json_or_key_value_pairs(argv, section, expected, monkeypatch):
    monkeypatch.delenv("RMSERVE_CONFIG", raising=False)
    settings = getattr(parsed_config(argv), section).model_dump()
    assert {key: settings[key] for key in expected} == expected


def test_a_section_flag_that_is_neither_json_nor_pairs_is_one_error_line(capsys):
    assert main(["serve", "--routing", "power_of_two"]) == 2
    err = capsys.readouterr().err
    assert "--routing must be a JSON object or key=value pairs" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--replicas", "2"], "replicas: 2"),
        (["--gateway-replicas", "2"], "gateway_replicas: 2"),
        (["--autoscaling", "max_replicas=2"], "autoscaling"),
    ],
)
def test_the_inprocess_runtime_refuses_what_only_ray_does(argv, named, capsys, monkeypatch):
    monkeypatch.delenv("RMSERVE_CONFIG", raising=False)
    assert main(["serve", "--runtime", "inprocess", *argv]) == 2
    err = capsys.readouterr().err
    assert named in err and "runtime 'ray'" in err and err.count("\n") == 1
