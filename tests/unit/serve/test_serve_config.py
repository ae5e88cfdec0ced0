"""ServerConfig and its sources: YAML < RMSERVE_* environment < CLI flags; unknown keys are errors."""

from __future__ import annotations

import argparse

import pytest

from rmserve.serve.cli.flags import add_config_flags, config_fields, flag_name, overrides_from_args
from rmserve.serve.config.loading import ConfigError, env_overrides, load_config
from rmserve.serve.config.settings import ServerConfig


def write(tmp_path, text: str):
    path = tmp_path / "server.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_documented():
    config = load_config()
    assert config == ServerConfig()
    assert (config.host, config.port, config.model.path) == ("127.0.0.1", 8000, "demo")
    assert config.limits.max_items_per_request == 1024
    assert config.limits.max_body_bytes == 32 * 1024 * 1024
    for path, field in config_fields():
        assert field.description, f"{'.'.join(path)} has no description"


def test_precedence_yaml_then_env_then_cli(tmp_path):
    yaml_file = write(tmp_path, "port: 9001\nreplicas: 2\nbatching:\n  max_batch_tokens: 4096\n  max_batch_items: 7\n")
    environ = {"RMSERVE_PORT": "9002", "RMSERVE_BATCHING__MAX_BATCH_TOKENS": "2048", "HOME": "/x"}
    config = load_config(yaml_path=yaml_file, environ=environ, overrides={"port": "9003"})
    assert config.port == 9003  # CLI wins
    assert config.batching.max_batch_tokens == 2048  # env beats YAML ...
    assert config.batching.max_batch_items == 7  # ... key by key inside a section
    assert config.replicas == 2  # YAML beats defaults


def test_yaml_on_and_off_unquoted_are_the_switch_words(tmp_path):
    """YAML reads an unquoted on/off as a boolean; the switches take it as the word the user wrote."""
    config = load_config(yaml_path=write(tmp_path, "model: {prefix_sharing: off, compile: off}\n"))
    assert (config.model.prefix_sharing, config.model.compile) == ("off", "off")
    config = load_config(yaml_path=write(tmp_path, "model:\n  prefix_sharing: on\n  compile: on\n"))
    assert (config.model.prefix_sharing, config.model.compile) == ("on", "on")
    with pytest.raises(ConfigError, match="model.compile"):
        load_config(yaml_path=write(tmp_path, "model: {compile: sometimes}\n"))


def test_env_nesting_lists_and_empty_values():
    environ = {
        "RMSERVE_MODEL__PATH": "/ckpt/rm",
        "RMSERVE_MODEL__MAX_LENGTH": "",
        "RMSERVE_API_KEYS": "k1, k2",
        "RMSERVE_RAY_DASHBOARD": "true",
        "RMSERVE_LIMITS__REQUEST_TIMEOUT_S": "2.5",
    }
    config = load_config(environ=environ)
    assert config.model.path == "/ckpt/rm"
    assert config.model.max_length is None
    assert config.api_key_values() == ["k1", "k2"]
    assert config.ray_dashboard is True
    assert config.limits.request_timeout_s == pytest.approx(2.5, abs=0)


def test_env_of_other_rmserve_parts_is_skipped():
    environ = {"RMSERVE_CACHE_DIR": "/c", "RMSERVE_BASE_URL": "http://x", "RMSERVE_API_KEY": "k", "RMSERVE_CONFIG": "f"}
    assert env_overrides(environ) == {}


@pytest.mark.parametrize("name", ["RMSERVE_PROT", "RMSERVE_MODEL__PAHT", "RMSERVE_PORT__X"])
def test_unknown_env_variable_is_rejected(name):
    with pytest.raises(ConfigError, match=name):
        load_config(environ={name: "1"})


def test_unknown_yaml_key_names_key_source_and_known_keys(tmp_path):
    yaml_file = write(tmp_path, "batching:\n  max_batch_tokenz: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(yaml_path=yaml_file)
    message = str(info.value)
    assert "unknown key 'batching.max_batch_tokenz'" in message
    assert str(yaml_file) in message
    assert "max_batch_tokens" in message and "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"port": 0}, "port (from command line): Input should be greater than or equal to 1"),
        ({"batching": {"batch_wait_timeout_s": -1}}, "batching.batch_wait_timeout_s"),
        ({"model": {"dtype": "fp64"}}, "model.dtype"),
        ({"model": {"max_batch_tokens": 1024}}, "set batching.max_batch_tokens"),
        ({"limits": {"max_items_per_request": 100, "max_queued_items": 10}}, "could never be admitted"),
    ],
)
def test_out_of_bounds_values_are_rejected_with_the_key(overrides, fragment):
    with pytest.raises(ConfigError, match="invalid configuration") as info:
        load_config(overrides=overrides)
    assert fragment in str(info.value)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(yaml_path=tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(yaml_path=write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(yaml_path=write(tmp_path, "port: [1\n"))
    assert load_config(yaml_path=write(tmp_path, "")) == ServerConfig()


def test_api_keys_never_show_in_repr_or_dump():
    config = load_config(overrides={"api_keys": ["sk-very-secret"]})
    assert "sk-very-secret" not in repr(config)
    assert "sk-very-secret" not in str(config.model_dump(mode="json"))
    assert config.api_key_values() == ["sk-very-secret"]


def test_model_spec_carries_the_batching_budget():
    config = load_config(overrides={"batching": {"max_batch_tokens": 1234}, "model": {"path": "/m"}})
    spec = config.model_spec()
    assert (spec.path, spec.max_batch_tokens) == ("/m", 1234)
    assert config.scorer_user_config() == {
        "batching": {"max_batch_tokens": 1234, "max_batch_items": 256, "batch_wait_timeout_s": 0.005},
        "max_queued_items": 8192,
    }


def test_every_setting_has_a_cli_flag_and_flags_override():
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    help_text = parser.format_help()
    for path, _field in config_fields():
        assert flag_name(path) in help_text
    args = parser.parse_args(
        ["--model", "/ckpt", "--port", "9100", "--max-batch-tokens", "512", "--api-key", "a", "--api-key", "b"]
        + ["--ray-dashboard", "--truncation", "error", "--request-timeout-s", "3"]
    )
    overrides = overrides_from_args(args)
    assert overrides == {
        "model": {"path": "/ckpt", "truncation": "error"},
        "port": "9100",
        "batching": {"max_batch_tokens": "512"},
        "api_keys": ["a", "b"],
        "ray_dashboard": True,
        "limits": {"request_timeout_s": "3"},
    }
    config = load_config(overrides=overrides)
    assert (config.port, config.batching.max_batch_tokens, config.limits.request_timeout_s) == (9100, 512, 3.0)
    assert overrides_from_args(parser.parse_args([])) == {}


def test_ray_environment_puts_the_gateway_itself_on_the_port_unless_several_gateways_or_proxy_asked():
    from rmserve.serve.rayserve.server import ray_environment

    direct = ray_environment(load_config(overrides={"port": 9123}))
    assert direct["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    # Ray allocates direct-ingress ports from range(min, max): exactly the configured port.
    assert (direct["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], direct["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == (
        "9123",
        "9124",
    )
    for overrides in ({"gateway_replicas": 2}, {"ingress": "proxy"}):
        env = ray_environment(load_config(overrides=overrides))
        assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
        assert "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT" not in env
    with pytest.raises(Exception, match="one Gateway replica"):
        load_config(overrides={"ingress": "direct", "gateway_replicas": 2})
