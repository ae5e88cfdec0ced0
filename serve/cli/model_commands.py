"""The model-side subcommands of ``rmserve``: ``demo`` and ``train``, and the file handling of ``score`` (offline JSONL
scoring; its model settings come from the server's configuration, see ``rmserve.serve.cli.score``).

Each command is ``add_X_args(parser)`` + ``cmd_X(args) -> int`` (the exit code). Errors that the
user can fix raise ``CommandError`` (exit 2) and print one line; the CLI entry point catches them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rmserve.model.errors import ModelLoadError, RMServeError


class CommandError(Exception):
    """A user-fixable problem: printed as one line, exit code 2."""


# -- score ----------------------------------------------------------------------------------------
# The model settings of `rmserve score` (--model, --dtype, --max-batch-tokens, ...) and its --config come from the
# server's configuration sources (rmserve.serve.cli.score); these are its own flags.
def add_score_io_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="JSONL, one item per line ({prompt, response} etc.)")
    parser.add_argument("--output", required=True, help="JSONL written with {id?, reward, truncated} per line")
    parser.add_argument("--normalize", action="store_true", help="apply the model's (r - mean) / std")
    parser.add_argument("--chunk-size", type=int, default=256, help="items handed to the engine at a time")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def read_items(path: Path, rm, *, progress: bool = True) -> tuple[list, list]:
    """Tokenize every line; collect ``(line number, message)`` for the bad ones instead of stopping. A bar follows
    the file's bytes (tokenizing a large file takes minutes before the first forward)."""
    from tqdm import tqdm

    tokenized, ids, problems = [], [], []
    bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="reading", disable=not progress)
    with open(path, "rb") as handle, bar:
        for lineno, line in enumerate(handle, start=1):
            bar.update(len(line))
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8-sig" if lineno == 1 else "utf-8"))  # a BOM may open the file
                item_id = obj.pop("id", None) if isinstance(obj, dict) else None
                tokenized.append(rm.tokenize(obj, len(tokenized)))
                ids.append(item_id)
            except UnicodeDecodeError:
                problems.append(f"line {lineno}: not valid UTF-8")
            except json.JSONDecodeError as exc:
                problems.append(f"line {lineno}: not valid JSON ({exc.msg})")
            except RMServeError as exc:
                problems.append(f"line {lineno}: {exc.message.split(': ', 1)[-1]}")
    return list(zip(ids, tokenized, strict=True)), problems


def score_file(args: argparse.Namespace, load_model: Callable[[], Any]) -> int:
    """Score ``args.input`` into ``args.output`` with the model ``load_model()`` returns (loaded once the input
    file is known to exist)."""
    from tqdm import tqdm

    in_path = Path(args.input)
    if not in_path.is_file():
        raise CommandError(f"--input {in_path} does not exist")
    rm = load_model()
    rows, problems = read_items(in_path, rm, progress=not args.no_progress)
    if problems:
        for p in problems[:20]:
            print(f"{in_path}: {p}", file=sys.stderr)
        more = " (first 20 shown)" if len(problems) > 20 else ""
        raise CommandError(f"{len(problems)} bad line(s) in {in_path}{more}; nothing written")
    if not rows:
        raise CommandError(f"{in_path} has no items")
    rewards: list[float] = []
    bar = tqdm(total=len(rows), unit="item", desc="scoring", disable=args.no_progress)
    for start in range(0, len(rows), args.chunk_size):
        chunk = [tok for _, tok in rows[start : start + args.chunk_size]]
        rewards += rm.score_tokenized(chunk)
        bar.update(len(chunk))
    bar.close()
    if args.normalize:
        rewards = rm.normalize(rewards)
    with open(args.output, "w", encoding="utf-8") as out:
        for (item_id, tok), reward in zip(rows, rewards, strict=True):
            record = ({"id": item_id} if item_id is not None else {}) | {"reward": reward, "truncated": tok.truncated}
            out.write(json.dumps(record) + "\n")
    print(f"scored {len(rows)} items with {rm.model_id} -> {args.output}", file=sys.stderr)
    return 0


# -- demo -----------------------------------------------------------------------------------------
def add_demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="cache directory to build into (default: rmserve's cache)")


def cmd_demo(args: argparse.Namespace) -> int:
    from rmserve.model.demo import MARKER, ensure_demo_model

    path = ensure_demo_model(Path(args.out) if args.out else None, progress=True)
    report = json.loads((path / MARKER).read_text())
    print(f"demo reward model: {path}")
    print(f"held-out pairwise accuracy: {report['heldout_pairwise_accuracy']:.3f}")
    return 0


# -- train ----------------------------------------------------------------------------------------
def add_train_args(parser: argparse.ArgumentParser) -> None:
    from rmserve.model.training import TrainConfig

    d = TrainConfig()
    parser.add_argument("--data", required=True, help="JSONL of {prompt, chosen, rejected} or {prompt, responses}")
    parser.add_argument("--out", required=True, help="directory the checkpoint is written to")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"optimiser steps (default {d.steps})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="records per step")
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (one-cycle schedule)")
    parser.add_argument("--beta", type=float, default=d.beta, help="weight of the imitation (LM) term")
    parser.add_argument("--hidden-size", type=int, default=d.hidden_size)
    parser.add_argument("--layers", type=int, default=d.num_layers)
    parser.add_argument("--heads", type=int, default=d.num_heads)
    parser.add_argument("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary trained on the data")
    parser.add_argument("--max-length", type=int, default=d.max_length, help="longest training sequence")
    parser.add_argument("--seed", type=int, default=d.seed)


def cmd_train(args: argparse.Namespace) -> int:
    from rmserve.model.demo import pairwise_accuracy
    from rmserve.model.loading import load_reward_model
    from rmserve.model.training import TrainConfig, read_preferences, train_reward_model

    data = Path(args.data)
    if not data.is_file():
        raise CommandError(f"--data {data} does not exist")
    records = read_preferences(data)
    held = records[: len(records) // 10] if len(records) >= 50 else []
    config = TrainConfig(
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.heads,
        intermediate_size=args.hidden_size * 3,
        vocab_size=args.vocab_size,
        max_length=args.max_length,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        beta=args.beta,
        seed=args.seed,
    )
    result = train_reward_model(records[len(held) :], Path(args.out), config, progress=True)
    print(f"checkpoint: {args.out}  loss {result.losses[0]:.3f} -> {sum(result.losses[-10:]) / 10:.3f}")
    if held:
        rm = load_reward_model(args.out, device="cpu")
        pairs = [{"prompt": r["prompt"], "chosen": r["responses"][0], "rejected": r["responses"][-1]} for r in held]
        print(f"held-out pairwise accuracy ({len(pairs)} records): {pairwise_accuracy(rm, pairs):.3f}")
    return 0


def run_command(fn, args: argparse.Namespace) -> int:
    """Run a command; user errors print one line and return 2, load/other failures return 1."""
    try:
        return fn(args)
    except (CommandError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"error: {'.'.join(map(str, first['loc']))}: {first['msg']}", file=sys.stderr)
        return 2
    except ModelLoadError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except RMServeError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2 if exc.status < 500 else 1
