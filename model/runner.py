"""``ForwardRunner``: one padded forward of a micro-batch's rows, on top of the keys and values the prefix cache holds.

What one forward does: each row computes ``seq[start:end]`` (its start was fixed by the plan), padded on the
``padding_side`` to the longest; the cached states of ``seq[:start]`` are stacked, left-aligned, into the model's
key/value cache, or, where the rows mostly read cached prompts, read in place by the attention (``cascade.py``, and the
batch-invariant attention of ``invariant.py``); positions count real tokens only, so every row sees the positions it
would see alone. The hidden state of each item's last real token comes **from the attention mask** (a ``StepIds``
item's: those at its readouts, its step separators), and the reward head runs in fp32 on those positions only; a
``LabelIds`` item's outcome is instead its labels' next-token probabilities, read from the judge's whole ``lm_head``
(``heads.label_probabilities``). Rows the plan marks ``store`` put their new states into the prefix cache, unless they
are not finite; given a ``RecentForwards``, the runner also holds a forward's keys and values there by reference and
says where each item row's states lie (``HeldRow``), so a later batch can copy a prompt out instead of computing it
again: a forward whose rows mostly compute new tokens (a group's first sample, perhaps after a cached system prompt; PPO
items). One whose cached columns outnumber its new ones is not held: its key/value buffer repeats the cached prompt for
every row, and what it adds (a group's later responses) is rarely anyone's prompt. The mask the backbone itself gets is
``masks.backbone_mask``'s (none for right-padded rows with nothing cached; sliding windows by position).

A micro-batch that runs out of accelerator memory is split in half and retried (``run``); a row that does not fit
even alone gets a typed error and the others are unaffected. Rewards do not depend on padding, neighbours or
splits (fp32: within 1e-5 of the item scored alone); with ``batch_invariant`` (``invariant.py``) they are the same bits.

Example::

    runner = ForwardRunner(backbone, head, padding_side="right", pad_id=0)
    runner.run([Row([1, 5, 9], 3, 0, 0)], prefix_cache, meter=None)   # -> {row: 0.31}
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from typing import Protocol

import torch

from .caches import HeldRow, PrefixKVCache, RecentForwards
from .cascade import SharedPrefixes, use_shared_prompt_attention
from .errors import InternalError, ItemTooLargeForMemoryError, RMServeError, WrongModelKindError
from .fusion import compile_backbone, wanted
from .heads import AttributedReward, ScoreHead, label_probabilities
from .invariant import BlockLayout, head_rewards, make_batch_invariant, unsupported_attention
from .masks import SlidingWindows, backbone_mask
from .planning import LabelIds, Row, StepIds

# An item's reward (one per readout for ``StepIds``) or error; a prefix row's None (its states are stored) or error.
RowOutcome = float | list[float] | RMServeError | None


class Meter(Protocol):
    """Where the runner reports what it computed (the engine's stats and observers)."""

    def forward(self, rows: int, padded_tokens: int, real_tokens: int, seconds: float) -> None: ...

    def oom_split(self) -> None: ...


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, from the mask alone (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.to(torch.long) * positions).argmax(dim=1)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class ForwardRunner:
    """Runs rows through a backbone and a head mapping ``[n, hidden]`` to ``[n, 1]`` (applied in fp32)."""

    def __init__(
        self,
        backbone: torch.nn.Module,
        head: torch.nn.Module,
        *,
        padding_side: str = "right",
        pad_id: int = 0,
        device: torch.device | str | None = None,
        batch_invariant: bool = False,
        compile: str = "auto",
    ):
        self.batch_invariant = batch_invariant
        self.compile = compile  # ``model.compile``: norms and MLPs through torch.compile (``fusion.py``)
        self.backbone = backbone
        self.head = head.float()
        self.padding_side = padding_side
        self.pad_id = pad_id
        self.device = torch.device(device) if device is not None else _module_device(backbone)
        # Test hook (off by default): called with (rows, longest row's length) before each forward; may raise OOM.
        self.fault_injector: Callable[[int, int], None] | None = None
        # transformers >= 5.24 names the key/value cache argument `cache`; earlier versions `past_key_values`.
        params = inspect.signature(backbone.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @property
    def backbone(self) -> torch.nn.Module:
        return self._backbone

    @backbone.setter
    def backbone(self, backbone: torch.nn.Module) -> None:
        """Every backbone it is given (a reload too) gets, in batch-invariant mode, the fixed-order linears and
        attention of ``invariant.py``; otherwise, where ``model.compile`` wants it, compiled norms and MLPs
        (``fusion.py``)."""
        if self.batch_invariant:
            make_batch_invariant(backbone)
        device = _module_device(backbone)
        fuse = wanted(self.compile, backbone, device, batch_invariant=self.batch_invariant)
        self.compiled_modules = compile_backbone(backbone) if fuse else 0  # of this backbone, not a previous one
        self._backbone = backbone
        config = getattr(backbone, "config", None)
        self._windows = SlidingWindows.of(config)
        # Cascade attention for rows that continue cached prompts (``cascade.py``): CPU, default mode, SDPA, no
        # sliding windows.
        self._cascade = (
            not self.batch_invariant
            and device.type == "cpu"
            and self._windows is None
            and unsupported_attention(backbone) is None
            and use_shared_prompt_attention(backbone)
        )
        self._eager = getattr(config, "_attn_implementation", None) == "eager"
        self._dtype = next((p.dtype for p in backbone.parameters() if p.is_floating_point()), torch.float32)

    def run(
        self,
        rows: list[Row],
        prefix_cache: PrefixKVCache | None,
        meter: Meter | None,
        recent: RecentForwards | None = None,
        held: dict[Row, HeldRow] | None = None,
    ) -> dict[Row, RowOutcome]:
        """``rows`` as one forward, or as halves (recursively) while it runs out of memory. With ``recent``, each
        forward is held there and ``held`` gets where each finite item row's states lie."""
        try:
            return self.forward(rows, prefix_cache, meter, recent, held)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            _free_accelerator_cache(self.device)
            if len(rows) == 1:
                row = rows[0]
                what = "an item" if row.item is not None else "a shared prefix"
                return {row: ItemTooLargeForMemoryError(f"{what} of {row.end} tokens does not fit in memory alone")}
            if meter is not None:
                meter.oom_split()
            half = len(rows) // 2
            return {
                **self.run(rows[:half], prefix_cache, meter, recent, held),
                **self.run(rows[half:], prefix_cache, meter, recent, held),
            }

    def forward(
        self,
        rows: list[Row],
        prefix_cache: PrefixKVCache | None,
        meter: Meter | None,
        recent: RecentForwards | None = None,
        held: dict[Row, HeldRow] | None = None,
    ) -> dict[Row, RowOutcome]:
        """One padded forward of ``rows`` on top of their cached states; stores the states of rows marked ``store``
        and, with ``recent``, holds the forward's states there (``held``: where each item row's lie)."""
        count, cached_width = len(rows), max(r.start for r in rows)
        width = max(r.new_tokens for r in rows)
        store = any(r.store for r in rows)
        keep = store or recent is not None
        pasts = [_past(row, prefix_cache) for row in rows]
        if self.fault_injector is not None:
            self.fault_injector(count, max(r.end for r in rows))
        input_ids, mask, position_ids = self._inputs(rows, cached_width, width)
        started = time.perf_counter()
        with torch.inference_mode():
            input_ids, mask, position_ids = (t.to(self.device) for t in (input_ids, mask, position_ids))
            # Rows that continue cached prompts and mostly read them (never held, see the module's docstring): the
            # attention reads each prompt where the prefix cache holds it, nothing is stacked into a padded buffer.
            in_place = cached_width > width and (
                self.batch_invariant or (self._cascade and self.padding_side == "right")
            )
            kwargs = {}
            prefixes = None
            if in_place:
                prefixes = SharedPrefixes.build(pasts, self.device)
                layers = prefixes.groups[0][1].shape[0]
                kv = prefixes.cache(count, cached_width, layers)
                if not self.batch_invariant:
                    kwargs["rmserve_prefixes"] = prefixes
            elif cached_width:
                kv = _stack_past(pasts, cached_width, width, self.device)
            else:
                kv = _empty_cache() if keep else None
            if kv is not None:
                kwargs[self._cache_kwarg] = kv
            if self.batch_invariant:  # where each token sits in its sequence, for the fixed-block attention
                kwargs["rmserve_blocks"] = self._layout(rows, cached_width, width, prefixes)
            out = self.backbone(
                input_ids=input_ids,
                attention_mask=self._backbone_mask(mask, cached_width),
                position_ids=position_ids,
                use_cache=kv is not None,
                **kwargs,
            )
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            last_col = last_token_index(mask[:, cached_width:])
            last = hidden[torch.arange(count, device=hidden.device), last_col.to(hidden.device)]
            scored = [r for r, row in enumerate(rows) if row.item is not None]
            values: list[float] = []
            labelled: dict[int, list[float] | RMServeError] = {}
            if scored:  # the head runs once, on every position any scored row reads
                at_row, at_col, counts = self._readout_columns(rows, scored, width, last_col.tolist())
                picked = hidden[torch.tensor(at_row, device=hidden.device), torch.tensor(at_col, device=hidden.device)]
                values = self._head(picked.float()).tolist()
                names = getattr(self.head, "attribute_names", ())
                if names:  # a multi-attribute head: the weighted reward, each attribute by name on it
                    table = self.head.outputs(picked.float(), invariant=self.batch_invariant).tolist()
                    rows_of = zip(values, table, strict=True)
                    values = [AttributedReward(v, zip(names, row, strict=True)) for v, row in rows_of]
                labelled = self._label_outcomes(rows, scored, counts, picked)
            # A NaN or inf anywhere in a row's keys or values reaches its last token (even a masked-out NaN does:
            # 0 x NaN is NaN), so a finite last hidden state vouches for the whole row.
            finite = torch.isfinite(last).all(dim=1).tolist() if keep else [True] * count
            if store:  # the layers hold the new columns alone when the prompts were read in place
                self._store(rows, finite, kv, 0 if in_place else cached_width, prefix_cache)
            if recent is not None and cached_width <= width:  # mostly new states (see the module's docstring)
                self._hold(rows, finite, kv, cached_width, width, recent, held)
        seconds = time.perf_counter() - started
        if meter is not None:
            meter.forward(count, count * width, sum(r.new_tokens for r in rows), seconds)
        outcomes: dict[Row, RowOutcome] = {
            row: None if ok else InternalError("the model produced non-finite states for a shared prefix")
            for row, ok in zip(rows, finite, strict=True)
            if row.item is None
        }
        first = 0
        for r in scored:
            row, n = rows[r], counts[r]
            row_values, first = labelled.get(r, values[first : first + n]), first + n
            if isinstance(row_values, RMServeError):
                outcomes[row] = row_values
                continue
            bad = [v for v in row_values if not math.isfinite(v)]
            if bad:
                outcomes[row] = InternalError(f"the model produced a non-finite reward ({bad[0]})")
            else:
                outcomes[row] = row_values if isinstance(row.seq, StepIds | LabelIds) else row_values[0]
        return outcomes

    def time_forward(self, tokens: int) -> float:
        """Seconds one row of ``tokens`` pad tokens takes (nothing stored, nothing reported)."""
        started = time.perf_counter()
        self.forward([Row([self.pad_id] * tokens, tokens, 0, 0)], None, None)
        return time.perf_counter() - started

    def max_positions(self) -> int:
        return int(getattr(getattr(self.backbone, "config", None), "max_position_embeddings", None) or 2048)

    # -- internals ----------------------------------------------------------------------------------
    def _head(self, picked: torch.Tensor) -> torch.Tensor:
        """The reward head on the hidden states it reads (fp32); row-independent in batch-invariant mode."""
        if not self.batch_invariant:
            return self.head(picked).squeeze(-1)
        if isinstance(self.head, ScoreHead):
            return self.head.forward_invariant(picked).squeeze(-1)
        return head_rewards(self.head, picked)

    def _label_outcomes(
        self, rows: list[Row], scored: list[int], counts: dict[int, int], picked: torch.Tensor
    ) -> dict[int, list[float] | RMServeError]:
        """Each ``LabelIds`` row's label probabilities at its last token (``picked`` holds the positions the head
        read, scored row after scored row), from the judge's whole ``lm_head``."""
        vocabulary = getattr(self.head, "vocabulary", None)
        outcomes: dict[int, list[float] | RMServeError] = {}
        first = 0
        for r in scored:
            seq, first = rows[r].seq, first + counts[r]
            if not isinstance(seq, LabelIds):
                continue
            if vocabulary is None:
                outcomes[r] = WrongModelKindError("this model is not a judge: it has no next-token probabilities")
                continue
            hidden = picked[first - 1]
            outcomes[r] = label_probabilities(
                vocabulary, hidden, seq.labels, seq.whole_vocabulary, invariant=self.batch_invariant
            )
        return outcomes

    def _readout_columns(
        self, rows: list[Row], scored: list[int], width: int, last_col: list[int]
    ) -> tuple[list[int], list[int], dict[int, int]]:
        """Batch rows and columns (among the new tokens) whose hidden states the head reads, scored row after scored
        row: a row's last token, or each of its ``StepIds`` readouts; and how many each row reads."""
        at_row: list[int] = []
        at_col: list[int] = []
        counts: dict[int, int] = {}
        for r in scored:
            row = rows[r]
            if isinstance(row.seq, StepIds):
                if row.seq.readouts[0] < row.start:  # the plan keeps readouts out of cached prefixes; a bug if not
                    raise RuntimeError(f"a row starting at {row.start} cannot read position {row.seq.readouts[0]}")
                first = 0 if self.padding_side == "right" else width - row.new_tokens
                cols = [first + p - row.start for p in row.seq.readouts]
            else:
                cols = [last_col[r]]
            at_row += [r] * len(cols)
            at_col += cols
            counts[r] = len(cols)
        return at_row, at_col, counts

    def _backbone_mask(self, mask: torch.Tensor, cached_width: int):
        """The attention mask the backbone gets (``masks.backbone_mask``); the batch-invariant attention reads the
        runner's block layout and keeps the plain mask."""
        if self.batch_invariant:
            return mask
        return backbone_mask(mask, cached_width, self.padding_side, self._windows, eager=self._eager, dtype=self._dtype)

    def _layout(self, rows: list[Row], cached_width: int, width: int, prefixes: SharedPrefixes | None) -> BlockLayout:
        """Where each row's tokens sit, for the batch-invariant attention; with ``prefixes``, the layers hold the new
        columns alone and each row's cached prompt is read where the prefix cache holds it."""
        starts, ends = [r.start for r in rows], [r.end for r in rows]
        prompts = prefixes.per_row(len(rows)) if prefixes is not None else None
        return BlockLayout.build(
            starts, ends, cached_width=cached_width, width=width, padding_side=self.padding_side, prompts=prompts
        )

    def _inputs(self, rows: list[Row], cached_width: int, width: int) -> tuple[torch.Tensor, ...]:
        """Token ids (padded to ``width``), the attention mask over cached and new tokens, and position ids."""
        count = len(rows)
        input_ids = torch.full((count, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((count, cached_width + width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids = torch.as_tensor(row.seq[row.start : row.end], dtype=torch.long)
            first = 0 if self.padding_side == "right" else width - len(ids)
            input_ids[r, first : first + len(ids)] = ids
            mask[r, : row.start] = 1
            mask[r, cached_width + first : cached_width + first + len(ids)] = 1
        # Positions count real tokens only, so every row sees the positions it would see alone.
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, cached_width:]
        return input_ids, mask, position_ids

    def _store(
        self, rows: list[Row], finite: list[bool], kv, new_from: int, prefix_cache: PrefixKVCache | None
    ) -> None:
        """Put the new keys and values (the layers' columns from ``new_from`` on) of each ``store`` row whose states
        are ``finite`` into the prefix cache (one poisoned token would otherwise corrupt every item that later shares
        the row's prefix)."""
        if prefix_cache is None:
            raise ValueError("rows marked store need a prefix cache")
        kept = [r for r, (row, ok) in enumerate(zip(rows, finite, strict=True)) if row.stored_tokens and ok]
        if not kept:
            return
        which = torch.tensor(kept, device=self.device)
        # [layers, 2, kept rows, kv_heads, new tokens, head_dim]: only the rows that keep states are copied
        new = torch.stack(
            [
                torch.stack((k[:, :, new_from:].index_select(0, which), v[:, :, new_from:].index_select(0, which)))
                for k, v in ((layer.keys, layer.values) for layer in kv.layers)
            ]
        )
        width = new.shape[4]
        for j, r in enumerate(kept):
            row = rows[r]
            first = 0 if self.padding_side == "right" else width - row.new_tokens
            prefix_cache.insert(row.seq, row.start, new[:, :, j, :, first : first + row.stored_tokens])

    def _hold(
        self,
        rows: list[Row],
        finite: list[bool],
        kv,
        cached_width: int,
        width: int,
        recent: RecentForwards,
        held: dict[Row, HeldRow] | None,
    ) -> None:
        """Hold this forward's keys and values in ``recent`` (by reference) and note where each finite item row's
        lie."""
        forward = recent.hold([(layer.keys, layer.values) for layer in kv.layers], cached_width)
        if forward is None or held is None:
            return
        for r, (row, ok) in enumerate(zip(rows, finite, strict=True)):
            if row.item is not None and ok:
                first = 0 if self.padding_side == "right" else width - row.new_tokens
                held[row] = HeldRow(forward, row.seq, r, row.start, first)


def _past(row: Row, prefix_cache: PrefixKVCache | None) -> list[torch.Tensor]:
    """The cached states of ``row.seq[:row.start]`` as segments (marks them recently used)."""
    if row.start == 0:
        return []
    known, segments = prefix_cache.match(row.seq, row.start) if prefix_cache is not None else (0, [])
    if known < row.start:  # the plan read a cache that has changed since: a stale plan, or a bug
        raise RuntimeError(f"the prefix cache holds {known} of the {row.start} tokens a planned row starts from")
    return segments


def _empty_cache():
    """A ``DynamicCache`` for a forward with nothing cached: each layer keeps the forward's new keys and values by
    reference (``DynamicLayer`` would concatenate them onto an empty tensor, a copy of every layer's states)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layer_class_to_replicate = _kept_layer
    return cache


def _kept_layer():
    """A ``DynamicLayer`` whose one ``update`` keeps the states it is given."""
    from transformers.cache_utils import DynamicLayer

    layer = DynamicLayer()

    def update(key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        layer.lazy_initialization(key_states, value_states)
        layer.keys, layer.values = key_states, value_states
        return key_states, value_states

    layer.update = update
    return layer


def _stack_past(pasts: list[list[torch.Tensor]], cached_width: int, width: int, device: torch.device):
    """A ``DynamicCache`` holding each row's cached states, left-aligned, padded to ``cached_width``, with room for the
    forward's ``width`` new columns: each layer writes its new keys and values into that room (no concatenation of
    the cached states with them, which would copy the cached states again)."""
    from transformers import DynamicCache

    sample = next(seg for past in pasts for seg in past)
    layers, _, heads, _, dim = sample.shape
    shape = (layers, 2, len(pasts), heads, cached_width + width, dim)
    buffer = torch.empty(shape, dtype=sample.dtype, device=device)
    for r, past in enumerate(pasts):
        pos = 0
        for seg in past:
            buffer[:, :, r, :, pos : pos + seg.shape[3]] = seg
            pos += seg.shape[3]
        buffer[:, :, r, :, pos:cached_width] = 0  # masked out, but 0 x NaN garbage would still be NaN
    # Built on empty views (building on the cached columns would copy them once more), then pointed at them.
    cache = DynamicCache(
        ddp_cache_data=[(buffer[layer, 0, :, :, :0], buffer[layer, 1, :, :, :0]) for layer in range(layers)]
    )
    for layer, held in zip(cache.layers, buffer, strict=True):
        layer.keys, layer.values = held[0, :, :, :cached_width], held[1, :, :, :cached_width]
        layer.update = _writer(layer, held[0], held[1], cached_width)
    return cache


def _writer(layer, keys: torch.Tensor, values: torch.Tensor, cached_width: int):
    """A cache layer's ``update`` that writes the new states into the columns after ``cached_width`` of ``keys`` /
    ``values`` and returns them whole."""

    def update(key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys[:, :, cached_width:] = key_states
        values[:, :, cached_width:] = value_states
        layer.keys, layer.values = keys, values
        return keys, values

    return update


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _free_accelerator_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
