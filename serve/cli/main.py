"""The ``rmserve`` command: ``rmserve serve`` here; ``score`` in ``rmserve.serve.cli.score`` (it reads the same
configuration sources), ``demo`` and ``train`` in ``rmserve.serve.cli.model_commands`` and ``bench`` in
``rmserve.benchmarks.cli``, imported only when chosen.

Exit codes: 0 success, 2 bad arguments or input (including an invalid configuration), 1 anything
else. Errors print one line, ``rmserve: error: ...``, never a traceback.

Example::

    rmserve serve --model demo --port 8000          # then: curl -s localhost:8000/ready
    RMSERVE_BATCHING__MAX_BATCH_TOKENS=8192 rmserve serve --config server.yaml
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rmserve.serve.cli.flags import add_config_file_arg, add_config_flags, config_from_args
from rmserve.serve.config.loading import ENV_NESTING, ENV_PREFIX, ConfigError
from rmserve.serve.config.settings import ServerConfig


class UsageError(ValueError):
    """Bad arguments or input: exit code 2."""


# Subcommands whose code lives elsewhere, imported only when chosen:
# name -> (help, module, function that adds its arguments, function that runs it and returns the exit code).
MODEL_CLI, SCORE_CLI, BENCH_CLI = (
    "rmserve.serve.cli.model_commands",
    "rmserve.serve.cli.score",
    "rmserve.benchmarks.cli",
)
EXTERNAL_COMMANDS = {
    "score": ("Score a JSONL file of items offline (no server).", SCORE_CLI, "add_score_args", "cmd_score"),
    "demo": ("Build (or find in the cache) the demo reward model.", MODEL_CLI, "add_demo_args", "cmd_demo"),
    "train": ("Train a small reward model on a JSONL preference file.", MODEL_CLI, "add_train_args", "cmd_train"),
    "bench": ("Run the benchmarks (engine, padding, server).", BENCH_CLI, "add_bench_args", "cmd_bench"),
}


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    add_config_file_arg(parser)
    add_config_flags(parser)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or SIGTERM, then shut down cleanly: on a local Ray instance (``--runtime ray``, the
    default) or in this process (``--runtime inprocess``)."""
    config = config_from_args(args)
    from rmserve.serve.routing.ensemble import check_ensemble_members

    check_ensemble_members(config)  # before anything loads: a clear one-line error (exit 2)
    if config.runtime == "inprocess":
        from rmserve.serve.inprocess.server import check_inprocess, run_inprocess

        check_inprocess(config)
        _prepare_model(config)
        return run_inprocess(config)
    _prepare_model(config)
    from rmserve.serve.rayserve.server import run_until_signalled

    return run_until_signalled(config)


def _prepare_model(config: ServerConfig) -> None:
    """Fail fast on a missing checkpoint, and build the demo here (once) rather than in every replica."""
    for path in dict.fromkeys(model.path for model in config.served_models()):
        if path == "demo":
            from rmserve.model.demo import ensure_demo_model

            print("rmserve: preparing the demo reward model (built once, then cached)", flush=True)
            ensure_demo_model(progress=True)
        elif not os.path.isdir(os.path.expanduser(path)):
            raise UsageError(f"model path {path!r} is not a directory (rmserve loads local checkpoints only)")


def _external_command(module: str, run: str) -> Callable[[argparse.Namespace], Any]:
    def handler(args: argparse.Namespace) -> Any:
        mod = importlib.import_module(module)
        runner = getattr(mod, "run_command", None)  # a module may map its own errors to exit codes
        return runner(getattr(mod, run), args) if runner else getattr(mod, run)(args)

    return handler


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmserve",
        description="rmserve: a reward-model inference server for RLHF.",
        epilog=f"Settings also come from environment variables {ENV_PREFIX}<FIELD>, sections joined by "
        f"'{ENV_NESTING}' (e.g. {ENV_PREFIX}PORT, {ENV_PREFIX}MODEL{ENV_NESTING}PATH).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="Serve a reward model over HTTP (Ray Serve, or --runtime inprocess) until Ctrl-C.",
        description="Start a local Ray instance and the rmserve application (or, with --runtime inprocess, serve from "
        "this one process without Ray); print the URL; run until Ctrl-C or SIGTERM. With no --model, the built-in "
        "demo reward model is served.",
        epilog=parser.epilog,
    )
    add_serve_args(serve)
    serve.set_defaults(handler=cmd_serve)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (text, module, add_args, run) in EXTERNAL_COMMANDS.items():
        sub = commands.add_parser(name, help=text, description=text)
        if name == chosen:  # imported only when used, so `rmserve serve` never depends on it
            try:
                getattr(importlib.import_module(module), add_args)(sub)
            except ImportError as exc:
                raise RuntimeError(f"'rmserve {name}' is not available in this installation ({exc})") from None
        sub.set_defaults(handler=_external_command(module, run))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rmserve`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv).parse_args(argv)
        return int(args.handler(args) or 0)
    except SystemExit as exc:  # argparse: --help (0) or bad arguments (2)
        return exc.code if isinstance(exc.code, int) else 2
    except (ConfigError, UsageError) as exc:
        return _fail(exc, 2)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from rmserve.model.errors import InvalidRequestError

        return _fail(exc, 2 if isinstance(exc, InvalidRequestError) else 1)


def _fail(exc: BaseException, code: int) -> int:
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"rmserve: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
