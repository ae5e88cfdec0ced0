"""Build a ``ServerConfig`` from a YAML file, ``RMSERVE_*`` environment variables and CLI overrides.

Precedence, lowest first: ``base`` (e.g. Ray Serve application args) < YAML < environment < overrides.
Nothing here reads ``os.environ`` unless it is passed in.

Example::

    load_config(yaml_path="server.yaml", environ=os.environ, overrides={"port": 9000, "model": {"path": "demo"}})
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rmserve.serve.config.settings import ServerConfig

ENV_PREFIX = "RMSERVE_"
ENV_NESTING = "__"
CONFIG_FILE_ENV = "RMSERVE_CONFIG"
# Variables of other rmserve parts (model cache, client SDK) that are not server settings.
NON_CONFIG_ENV = frozenset({CONFIG_FILE_ENV, "RMSERVE_CACHE_DIR", "RMSERVE_BASE_URL", "RMSERVE_API_KEY"})


class ConfigError(ValueError):
    """The configuration is invalid; the message is one line a user can act on."""


def load_config(
    *,
    yaml_path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Merge the sources (later wins, nested sections merge key by key) and validate."""
    layers: list[tuple[str, Mapping[str, Any]]] = [("application args", base or {})]
    if yaml_path is not None:
        layers.append((f"config file {yaml_path}", read_yaml(yaml_path)))
    if environ is not None:
        layers.append(("environment", env_overrides(environ)))
    layers.append(("command line", overrides or {}))
    merged: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    for label, layer in layers:
        _merge(merged, layer, origin, label, ())
    try:
        return ServerConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, origin)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    return data


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``RMSERVE_SECTION__FIELD=value`` → ``{"section": {"field": "value"}}``; unknown names are errors."""
    result: dict[str, Any] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in NON_CONFIG_ENV:
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split(ENV_NESTING))
        annotation = field_annotation(path)
        if annotation is None:
            raise ConfigError(
                f"unknown environment variable {name}: no setting {'.'.join(path)!r} "
                f"(sections nest with '{ENV_NESTING}', e.g. RMSERVE_MODEL__PATH)"
            )
        raw = environ[name]
        value: Any = None if raw == "" else raw
        if value is not None and _is_list(annotation):
            value = [v.strip() for v in raw.split(",") if v.strip()]
        elif value is not None and is_mapping_setting(annotation):
            value = parse_json_object(raw, f"environment variable {name}")
        node = result
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return result


def field_annotation(path: tuple[str, ...], model: type[BaseModel] = ServerConfig) -> Any:
    """The annotation of the setting at ``path``, or None when there is no such setting."""
    field = model.model_fields.get(path[0])
    if field is None:
        return None
    if len(path) == 1:
        return field.annotation
    sub = _section(field.annotation)
    return field_annotation(path[1:], sub) if sub is not None else None


def _section(annotation: Any) -> type[BaseModel] | None:
    """The settings section an annotation holds: a model, or an optional one (``AutoscalingSettings | None``)."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def section_model(path: tuple[str, ...]) -> type[BaseModel]:
    """The pydantic model that holds the keys under ``path`` (``()`` is ``ServerConfig``)."""
    model: type[BaseModel] = ServerConfig
    for part in path:
        sub = _section(model.model_fields[part].annotation) if part in model.model_fields else None
        if sub is None:
            break
        model = sub
    return model


def describe_validation_error(exc: ValidationError, origin: Mapping[tuple[str, ...], str] | None = None) -> str:
    """One line per problem, joined by '; ': the key, where it came from, and what is wrong."""
    origin = origin or {}
    problems = []
    for err in exc.errors()[:5]:
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or "config"
        source = _source(loc, origin)
        where = f" (from {source})" if source else ""
        if err["type"] == "extra_forbidden":
            known = ", ".join(section_model(loc[:-1]).model_fields)
            problems.append(f"unknown key {key!r}{where}; known keys here: {known}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{key}{where}: {msg}" if loc else msg)
    more = len(exc.errors()) - len(problems)
    return "invalid configuration: " + "; ".join(problems) + (f"; and {more} more" if more > 0 else "")


def _merge(target: dict, layer: Mapping[str, Any], origin: dict, label: str, prefix: tuple[str, ...]) -> None:
    if not isinstance(layer, Mapping):
        raise ConfigError(f"{label}: {'.'.join(prefix) or 'config'} must be a mapping")
    for key, value in layer.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            if not isinstance(target.get(key), dict):
                target[key] = {}
                origin[path] = label
            _merge(target[key], value, origin, label, path)
        else:
            target[key] = value
            origin[path] = label


def _source(loc: tuple[str, ...], origin: Mapping[tuple[str, ...], str]) -> str | None:
    for end in range(len(loc), 0, -1):
        if loc[:end] in origin:
            return origin[loc[:end]]
    return None


def parse_json_object(raw: str, what: str) -> dict[str, Any]:
    """A mapping setting or a section given as text (environment, flag): a JSON object, e.g.
    ``{"policy": "power_of_two"}``, or ``key=value`` pairs joined by commas, e.g.
    ``policy=power_of_two,imbalance_items=64`` (each value read as JSON when it is a JSON scalar, else as text)."""
    try:
        value = json.loads(raw)
    except ValueError:
        value = _key_values(raw)
    if not isinstance(value, dict):
        raise ConfigError(
            f'{what} must be a JSON object or key=value pairs, e.g. \'{{"policy": "power_of_two"}}\' or '
            f"'policy=power_of_two', not {raw!r}"
        )
    return value


def _key_values(raw: str) -> dict[str, Any] | None:
    pairs = [part.partition("=") for part in raw.split(",") if part.strip()]
    if not pairs or any(not sep or not key.strip() for key, sep, _ in pairs):
        return None
    result: dict[str, Any] = {}
    for key, _, text in pairs:
        try:
            value = json.loads(text)
        except ValueError:
            value = text.strip()
        result[key.strip()] = value if value is None or isinstance(value, str | int | float | bool) else text.strip()
    return result


def is_mapping_setting(annotation: Any) -> bool:
    """Whether a setting is a mapping or a whole section (given as a JSON object or ``key=value`` pairs in the
    environment and on flags)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(is_mapping_setting(a) for a in typing.get_args(annotation))
    return typing.get_origin(annotation) is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel))


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return typing.get_origin(annotation) is list
