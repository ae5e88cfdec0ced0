"""Issue 12: several models and ensembles in one configuration (YAML, CLI flags), and their resources."""

from __future__ import annotations

import argparse

import pytest

from rmserve.serve.cli.flags import add_config_flags, overrides_from_args
from rmserve.serve.config.loading import ConfigError, load_config
from rmserve.serve.config.resources import Capacity, ResourceError, check_fits, resolve_resources
from rmserve.serve.config.settings import ServerConfig

TWO = """
model: {dtype: fp32, max_length: 256}
replicas: 2
models:
  - {name: helpful, path: /ckpt/a}
  - {name: safe, path: /ckpt/b, dtype: bf16, replicas: 1, num_cpus: 0.5, served_model_names: [safety-rm]}
ensembles:
  - {name: both, members: {helpful: 1.0, safe: 2.0}, combine: mean_minus_std, lambda: 0.5}
"""


def load(tmp_path, text: str, **kwargs) -> ServerConfig:
    path = tmp_path / "server.yaml"
    path.write_text(text)
    return load_config(yaml_path=path, **kwargs)


def test_entries_take_the_model_section_as_defaults_and_the_server_resources(tmp_path):
    helpful, safe = load(tmp_path, TWO).served_models()
    assert (helpful.name, helpful.path, helpful.dtype, helpful.max_length) == ("helpful", "/ckpt/a", "fp32", 256)
    assert (helpful.replicas, helpful.num_cpus, helpful.num_gpus) == (2, "auto", "auto")
    assert (safe.name, safe.dtype, safe.max_length, safe.replicas, safe.num_cpus) == ("safe", "bf16", 256, 1, 0.5)
    assert safe.served_model_names == ["safety-rm"]
    spec = load(tmp_path, TWO, overrides={"batching": {"max_batch_tokens": 999}}).model_spec(1)
    assert (spec.path, spec.dtype, spec.max_batch_tokens) == ("/ckpt/b", "bf16", 999)


def test_a_single_model_is_served_as_before():
    (only,) = ServerConfig.model_validate({"model": {"path": "/ckpt/a"}, "served_model_names": ["rm"]}).served_models()
    assert (only.name, only.path, only.served_model_names, only.replicas) == (None, "/ckpt/a", ["rm"], 1)
    assert ServerConfig().model_spec() == ServerConfig().model.model_copy(update={"max_batch_tokens": 16384})


def test_the_ensemble_is_read_with_its_lambda(tmp_path):
    (both,) = load(tmp_path, TWO).ensembles
    assert (both.name, both.members) == ("both", {"helpful": 1.0, "safe": 2.0})
    assert (both.combine, both.lambda_) == ("mean_minus_std", 0.5)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"models": [{"path": "/a"}]}, "models[0].name is required"),
        ({"models": [{"name": "a", "path": "/a"}, {"name": "a", "path": "/b"}]}, "already the name of models[0]"),
        ({"models": [{"name": "a b", "path": "/a"}]}, "models.0.name"),
        ({"models": [{"name": "a", "max_batch_tokens": 9}]}, "batching.max_batch_tokens"),
        ({"models": [{"name": "a"}], "served_model_names": ["x"]}, "single model"),
        ({"models": [{"name": "a"}], "ensembles": [{"name": "a", "members": {"a": 1}}]}, "already the name"),
        ({"models": [{"name": "a"}], "ensembles": [{"name": "e", "members": {"b": 1}}]}, "'b' is not the name"),
        ({"ensembles": [{"name": "e", "members": {"a": 1}}]}, "needs a models list"),
        ({"models": [{"name": "a"}], "ensembles": [{"name": "e", "members": {"a": 1}, "combine": "max"}]}, "combine"),
        ({"models": [{"name": "a", "dtype": "fp64"}]}, "models.0.dtype"),
    ],
)
def test_mistakes_name_the_field(data, message):
    with pytest.raises(ConfigError, match="invalid configuration") as info:
        load_config(base=data)
    assert message in str(info.value)


def parse(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return overrides_from_args(parser.parse_args(list(argv)))


def test_model_flag_one_path_or_several_named_models():
    assert parse("--model", "/ckpt/a") == {"model": {"path": "/ckpt/a"}}
    assert parse("--model", "demo") == {"model": {"path": "demo"}}
    overrides = parse("--model", "helpful=/ckpt/a", "--model", "safe=/ckpt/b=c", "--dtype", "fp32")
    assert overrides == {
        "models": [{"name": "helpful", "path": "/ckpt/a"}, {"name": "safe", "path": "/ckpt/b=c"}],
        "model": {"dtype": "fp32"},
    }
    config = load_config(overrides=overrides)
    assert [(m.name, m.path, m.dtype) for m in config.served_models()] == [
        ("helpful", "/ckpt/a", "fp32"),
        ("safe", "/ckpt/b=c", "fp32"),
    ]
    assert parse("--model", "./x=y") == {"model": {"path": "./x=y"}}  # a path, not NAME=PATH


def test_automatic_cpus_are_shared_by_every_replica_of_every_model_and_explicit_ones_kept():
    config = ServerConfig.model_validate(
        {"replicas": 2, "models": [{"name": "a"}, {"name": "b", "replicas": 1}, {"name": "c", "num_cpus": 1.5}]}
    )
    resolved = resolve_resources(config, Capacity(cpus=8, gpus=0))
    cpus = [(m.replicas, m.num_cpus, m.num_gpus) for m in resolved.served_models()]
    # 8 - 0.25 (Gateway) - 2 x 1.5 (c) = 4.75 over the 3 automatic replicas of a and b
    assert cpus == [(2, 1.58, 0.0), (1, 1.58, 0.0), (2, 1.5, 0.0)]
    check_fits(resolved, Capacity(cpus=8, gpus=0))


def test_a_machine_too_small_for_all_models_is_refused_with_each_model_named():
    config = ServerConfig.model_validate({"num_cpus": 1, "models": [{"name": "a"}, {"name": "b"}]})
    with pytest.raises(ResourceError) as info:
        check_fits(config, Capacity(cpus=2, gpus=0))
    message = str(info.value)
    assert "asks for 2.25 CPUs" in message and "Scorer a: 1 replica(s) x 1 CPUs" in message and "Scorer b" in message
