"""``rmserve score``: offline scoring of a JSONL file, configured from the same sources as ``rmserve serve``.

The model settings (``--model``, ``--dtype``, ``--max-length``, ``--template``, ..., and ``--max-batch-tokens``) are
the ``ServerConfig`` fields of the ``model`` section plus the batching token budget, read like ``rmserve serve``
reads them: a YAML file (``--config`` or ``$RMSERVE_CONFIG``) < ``RMSERVE_*`` environment variables < flags. So a
``prod.yaml`` written for the server scores a file with the same model, template, truncation and budget.

Example::

    rmserve score --config prod.yaml --input items.jsonl --output rewards.jsonl
    RMSERVE_MODEL__PATH=/ckpt/rm rmserve score --max-batch-tokens 8192 --input items.jsonl --output rewards.jsonl
"""

from __future__ import annotations

import argparse

from rmserve.model.cli_commands import add_score_io_args, run_command, score_file

from .cli_flags import add_config_file_arg, add_config_flags, config_from_args

__all__ = ["add_score_args", "cmd_score", "run_command"]


def scores_with(path: tuple[str, ...]) -> bool:
    """The settings `rmserve score` has flags for: the model section and the batching token budget."""
    return path[0] == "model" or path == ("batching", "max_batch_tokens")


def add_score_args(parser: argparse.ArgumentParser) -> None:
    add_config_file_arg(parser, "; the same file `rmserve serve` reads")
    add_config_flags(parser, include=scores_with)
    add_score_io_args(parser)


def cmd_score(args: argparse.Namespace) -> int:
    """Score ``--input`` into ``--output`` with the model the configuration describes."""
    config = config_from_args(args)

    def load_model():
        from rmserve.model import load_reward_model

        return load_reward_model(config.model_spec())

    return score_file(args, load_model)
