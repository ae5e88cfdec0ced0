"""CLI flags generated from ``ServerConfig``, so every setting has a flag and its help is the field's description.

Fields of the ``model``, ``batching``, ``limits`` and ``compat`` sections become top-level flags (``--dtype``,
``--max-batch-tokens``, ``--request-timeout-s``); ``model.path`` is ``--model``, ``compat.normalize`` is
``--compat-normalize`` and ``api_keys`` is the repeatable ``--api-key``. Values stay strings (mappings such as
``--resources '{"rmserve_scorer": 1}'`` are JSON objects); ``load_config`` validates them like any other source.

``--model`` is repeatable: one ``--model PATH`` sets ``model.path`` (one model, as always); ``--model NAME=PATH``
(one or more) builds the ``models`` list, whose entries take the other model flags (``--dtype`` ...) as defaults.
``models`` and ``ensembles`` are lists of sections: YAML or the environment only.

Example::

    add_config_flags(parser)
    overrides_from_args(parser.parse_args(["--port", "9000", "--model", "demo"]))
    # {"port": "9000", "model": {"path": "demo"}}
    overrides_from_args(parser.parse_args(["--model", "helpful=/ckpt/a", "--model", "safe=/ckpt/b"]))
    # {"models": [{"name": "helpful", "path": "/ckpt/a"}, {"name": "safe", "path": "/ckpt/b"}]}
"""

from __future__ import annotations

import argparse
import os
import re
import typing
from collections.abc import Callable, Iterator
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from rmserve.serve.config.loading import (
    CONFIG_FILE_ENV,
    ConfigError,
    is_mapping_setting,
    load_config,
    parse_json_object,
)
from rmserve.serve.config.settings import ServerConfig

FLATTENED_SECTIONS = ("model", "batching", "limits", "compat")
SKIPPED = frozenset({("model", "max_batch_tokens"), ("testing",), ("models",), ("ensembles",)})
MODEL_FLAG = ("model", "path")
# ``NAME=PATH``: a model name (served_models.NAME_PATTERN) before the first '='.
_NAMED_MODEL = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,63})=(.+)")
RENAMED = {("model", "path"): "--model", ("api_keys",): "--api-key", ("compat", "normalize"): "--compat-normalize"}
_DEST_PREFIX = "config:"


def config_fields() -> Iterator[tuple[tuple[str, ...], FieldInfo]]:
    """Every setting that has a flag, as (path, field)."""
    for name, field in ServerConfig.model_fields.items():
        if (name,) in SKIPPED:
            continue
        if name in FLATTENED_SECTIONS:
            section = typing.cast(type[BaseModel], field.annotation)
            for sub, subfield in section.model_fields.items():
                if (name, sub) not in SKIPPED:
                    yield (name, sub), subfield
        else:
            yield (name,), field


def flag_name(path: tuple[str, ...]) -> str:
    return RENAMED.get(path) or "--" + path[-1].replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, include: Callable[[tuple[str, ...]], bool] | None = None) -> None:
    """Add one flag per setting (those ``include`` accepts), grouped by section; absent flags leave the setting to
    other sources."""
    groups = {s: parser.add_argument_group(f"{s} settings") for s in FLATTENED_SECTIONS}
    groups["server"] = parser.add_argument_group("server settings")
    seen: set[str] = set()
    for path, field in config_fields():
        if include is not None and not include(path):
            continue
        flag = flag_name(path)
        if flag in seen:
            raise AssertionError(f"two settings map to {flag}")
        seen.add(flag)
        kwargs: dict[str, Any] = {"dest": _DEST_PREFIX + ".".join(path), "default": argparse.SUPPRESS}
        annotation = field.annotation
        if path == MODEL_FLAG:
            kwargs.update(action="append", metavar="PATH|NAME=PATH")
        elif annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is list:
            kwargs.update(action="append", metavar="KEY")
        elif is_mapping_setting(annotation):
            kwargs.update(type=_json_object_flag(flag), metavar="JSON")
        elif typing.get_origin(annotation) is Literal:
            kwargs["choices"] = typing.get_args(annotation)
        else:
            kwargs["metavar"] = path[-1].upper()
        kwargs["help"] = describe_field(field).replace("%", "%%")
        if path == MODEL_FLAG:
            kwargs["help"] += " Repeat as NAME=PATH to serve several models (the first is the default)."
        groups.get(path[0], groups["server"]).add_argument(flag, **kwargs)


def describe_field(field: FieldInfo) -> str:
    """The field's description, its bounds and its default."""
    bounds = []
    for item in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, attr, None) is not None:
                bounds.append(f"{sign} {getattr(item, attr)}")
    default = field.get_default(call_default_factory=True)
    parts = [field.description or ""]
    if bounds:
        parts.append(f"[{', '.join(bounds)}]")
    if default not in (None, []):
        parts.append(f"(default: {default!r})" if isinstance(default, str) else f"(default: {default})")
    return " ".join(p for p in parts if p)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given on the command line, as a nested settings mapping."""
    result: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if not dest.startswith(_DEST_PREFIX):
            continue
        path = dest[len(_DEST_PREFIX) :].split(".")
        if tuple(path) == MODEL_FLAG:
            _add_models(result, value)
            continue
        node = result
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return result


def add_config_file_arg(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--config FILE``: the YAML settings file (default ``$RMSERVE_CONFIG``)."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"YAML file of settings (default: ${CONFIG_FILE_ENV}){note}. Precedence: file < environment < flags.",
    )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The settings of a command: its ``--config`` file (or ``$RMSERVE_CONFIG``) < ``RMSERVE_*`` < its flags."""
    return load_config(
        yaml_path=args.config or os.environ.get(CONFIG_FILE_ENV),
        environ=os.environ,
        overrides=overrides_from_args(args),
    )


def _json_object_flag(flag: str) -> Callable[[str], dict[str, Any]]:
    def parse(raw: str) -> dict[str, Any]:
        try:
            return parse_json_object(raw, flag)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _add_models(result: dict[str, Any], values: list[str]) -> None:
    """``--model`` values: one plain path is ``model.path``; otherwise each is an entry of ``models``."""
    named = [_NAMED_MODEL.fullmatch(v) for v in values]
    if len(values) == 1 and named[0] is None:
        result.setdefault("model", {})["path"] = values[0]
        return
    result["models"] = [{"name": m[1], "path": m[2]} if m else {"path": v} for v, m in zip(values, named, strict=True)]
