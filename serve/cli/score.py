"""``rmserve score``: offline scoring of a JSONL file, configured from the same sources as ``rmserve serve``.

The model settings (``--model``, ``--dtype``, ``--max-length``, ``--template``, ..., and ``--max-batch-tokens``) are
the ``ServerConfig`` fields of the ``model`` section plus the batching token budget, read like ``rmserve serve``
reads them: a YAML file (``--config`` or ``$RMSERVE_CONFIG``) < ``RMSERVE_*`` environment variables < flags. So a
``prod.yaml`` written for the server scores a file with the same model, template, truncation and budget.

With several models (``--model NAME=PATH`` repeated, or a ``models`` list in the YAML) each model scores the file
in turn (one loaded at a time) and each line gets, besides ``reward`` / ``truncated`` of the first model,
``rewards: {model: reward}`` for every model; and for every ensemble of the configuration
``ensembles: {name: {reward, spread, members: {model: normalised reward}}}`` (``rmserve.serve.routing.ensemble``).
``truncated`` is true when any model truncated the item.

Example::

    rmserve score --config prod.yaml --input items.jsonl --output rewards.jsonl
    RMSERVE_MODEL__PATH=/ckpt/rm rmserve score --max-batch-tokens 8192 --input items.jsonl --output rewards.jsonl
    rmserve score --model helpful=/ckpt/a --model safe=/ckpt/b --input items.jsonl --output rewards.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rmserve.serve.cli.flags import add_config_file_arg, add_config_flags, config_from_args
from rmserve.serve.cli.model_commands import CommandError, add_score_io_args, read_items, run_command, score_file
from rmserve.serve.config.settings import ServerConfig
from rmserve.serve.routing.ensemble import combine_rewards

__all__ = ["add_score_args", "cmd_score", "run_command"]


def scores_with(path: tuple[str, ...]) -> bool:
    """The settings `rmserve score` has flags for: the model section (``--model`` repeatable) and the batching
    token budget."""
    return path[0] == "model" or path == ("batching", "max_batch_tokens")


def add_score_args(parser: argparse.ArgumentParser) -> None:
    add_config_file_arg(parser, "; the same file `rmserve serve` reads")
    add_config_flags(parser, include=scores_with)
    add_score_io_args(parser)


def cmd_score(args: argparse.Namespace) -> int:
    """Score ``--input`` into ``--output`` with the model the configuration describes."""
    config = config_from_args(args)

    if config.models:
        return score_file_with_models(args, config)

    def load_model():
        from rmserve.model import load_reward_model

        return load_reward_model(config.model_spec())

    return score_file(args, load_model)


def score_file_with_models(args: argparse.Namespace, config: ServerConfig) -> int:
    """Every served model scores ``args.input`` (one loaded at a time); ensembles combine their members."""
    from tqdm import tqdm

    from rmserve.model import load_reward_model

    in_path = Path(args.input)
    if not in_path.is_file():
        raise CommandError(f"--input {in_path} does not exist")
    rewards: dict[str, list[float]] = {}
    normalized: dict[str, list[float]] = {}
    truncated: list[bool] = []
    ids: list = []
    for index, served in enumerate(config.served_models()):
        rm = load_reward_model(config.model_spec(index))
        rows, problems = read_items(in_path, rm, progress=not args.no_progress)
        if problems:
            for p in problems[:20]:
                print(f"{in_path}: {p}", file=sys.stderr)
            raise CommandError(f"{len(problems)} bad line(s) in {in_path} for model {served.name}; nothing written")
        if not rows:
            raise CommandError(f"{in_path} has no items")
        raw: list[float] = []
        bar = tqdm(total=len(rows), unit="item", desc=f"scoring ({served.name})", disable=args.no_progress)
        for start in range(0, len(rows), args.chunk_size):
            chunk = [tok for _, tok in rows[start : start + args.chunk_size]]
            raw += rm.score_tokenized(chunk)
            bar.update(len(chunk))
        bar.close()
        needs_z = any(served.name in e.members for e in config.ensembles)
        if needs_z or args.normalize:
            if rm.normalization is None:
                raise CommandError(f"model {served.name} has no normalisation (reward_mean/reward_std or config.json)")
            normalized[str(served.name)] = rm.normalize(raw)
        rewards[str(served.name)] = normalized[str(served.name)] if args.normalize else raw
        flags = [tok.truncated for _, tok in rows]
        truncated = [a or b for a, b in zip(truncated, flags, strict=True)] if truncated else flags
        ids = [item_id for item_id, _ in rows]
        del rm
    ensembles = {e.name: combine_rewards(e, {m: normalized[m] for m in e.members}) for e in config.ensembles}
    first = next(iter(rewards))
    with open(args.output, "w", encoding="utf-8") as out:
        for i, item_id in enumerate(ids):
            record = {"id": item_id} if item_id is not None else {}
            record |= {"reward": rewards[first][i], "truncated": truncated[i]}
            record["rewards"] = {name: values[i] for name, values in rewards.items()}
            if ensembles:
                record["ensembles"] = {
                    name: {
                        "reward": e.rewards[i],
                        "spread": e.spread[i],
                        "members": {m: values[i] for m, values in e.members.items()},
                    }
                    for name, e in ensembles.items()
                }
            out.write(json.dumps(record) + "\n")
    print(f"scored {len(ids)} items with {', '.join(rewards)} -> {args.output}", file=sys.stderr)
    return 0
