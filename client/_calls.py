"""The I/O-free description of each endpoint call: its chunked request bodies and how answers merge.

A ``Call`` is what a client method turns into before any byte is sent: method, path, the chunks
(each a slice of the caller's list with its JSON body) and a ``merge`` that turns the chunks'
decoded answers, in chunk order, into the typed result. Part of the shared core (see ``_core``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import APIResponseValidationError, APIStatusError
from .types import Item, ModelInfo, PreferenceResult, Prompt, RerankResult, ScoreResult, StepResult, Usage

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Chunk:
    """Elements ``[start, stop)`` of the caller's list, and the JSON body that carries them (``None``: no body)."""

    start: int
    stop: int
    body: dict[str, Any] | None


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    chunks: list[Chunk]
    merge: Callable[[list[Chunk], list[Any]], T]
    # The body's list field ("items", "pairs", "groups"): error params of later chunks are re-based on it.
    param_key: str | None = None


def plan_chunks(weights: Sequence[int], max_weight: int) -> list[tuple[int, int]]:
    """Split elements into contiguous ``(start, stop)`` runs of total weight at most ``max_weight``.

    An element heavier than ``max_weight`` on its own gets a run of its own (the server then decides).

    >>> plan_chunks([1] * 5, 2)
    [(0, 2), (2, 4), (4, 5)]
    >>> plan_chunks([3, 1, 4, 1], 4)
    [(0, 2), (2, 3), (3, 4)]
    """
    runs: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, weight in enumerate(weights):
        if i > start and total + weight > max_weight:
            runs.append((start, i))
            start, total = i, 0
        total += weight
    if len(weights) > start:
        runs.append((start, len(weights)))
    return runs


def _as_list(name: str, value: Iterable[Any]) -> list[Any]:
    # A bare string is a Sequence too; zipping it would silently score characters.
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list, got {type(value).__name__}")
    return list(value)


def _same_length(**lists: list[Any]) -> None:
    lengths = {name: len(v) for name, v in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"length mismatch: {', '.join(f'{k}={v}' for k, v in lengths.items())}")


def _prompt(prompt: Prompt) -> Any:
    return prompt if isinstance(prompt, str) else [dict(turn) for turn in prompt]


def _validate(cls: type[M], body: Any) -> M:
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        raise APIResponseValidationError(f"unexpected response body for {cls.__name__}: {exc}", body=body) from exc


def _check_count(what: str, got: int, chunk: Chunk, body: Any) -> None:
    if got != chunk.stop - chunk.start:
        raise APIResponseValidationError(
            f"server returned {got} {what} for {chunk.stop - chunk.start} inputs", body=body
        )


def _chunks(key: str, elements: list[Any], weights: list[int], limit: int, extra: dict[str, Any]) -> list[Chunk]:
    return [Chunk(a, b, {key: elements[a:b], **extra}) for a, b in plan_chunks(weights, limit)]


def _concatenated(response: type[BaseModel], field: str) -> Callable[[list[Chunk], list[Any]], list[Any]]:
    """A ``merge`` for answers that hold one entry per input in ``field``: the chunks' lists, in chunk order."""

    def merge(chunks: list[Chunk], bodies: list[Any]) -> list[Any]:
        merged: list[Any] = []
        for chunk, body in zip(chunks, bodies, strict=True):
            part = getattr(_validate(response, body), field)
            _check_count(field, len(part), chunk, body)
            merged.extend(part)
        return merged

    return merge


def _options(normalize: bool, model: str | None, **more: Any) -> dict[str, Any]:
    """The body fields every chunk of a call repeats; ``model`` only when one is named (absent: the server's first)."""
    return {**more, "normalize": normalize, **({"model": model} if model is not None else {})}


# --- /v1/score


def pair_items(prompts: Iterable[Prompt], responses: Iterable[str]) -> list[dict[str, Any]]:
    """``[{"prompt": p, "response": r}, ...]``; raises ``ValueError`` when the lengths differ."""
    prompts, responses = _as_list("prompts", prompts), _as_list("responses", responses)
    _same_length(prompts=prompts, responses=responses)
    return [{"prompt": _prompt(p), "response": r} for p, r in zip(prompts, responses, strict=True)]


def _merge_score(chunks: list[Chunk], bodies: list[Any]) -> ScoreResult:
    rewards: list[float] = []
    truncated: list[int] = []
    tokens, model = 0, None
    parts: list[ScoreResult] = []
    for chunk, body in zip(chunks, bodies, strict=True):
        part = _validate(ScoreResult, body)
        _check_count("rewards", len(part.rewards), chunk, body)
        rewards.extend(part.rewards)
        truncated.extend(chunk.start + i for i in part.truncated)  # chunk-local -> index in the whole call
        tokens += part.usage.input_tokens
        model = model or part.model
        parts.append(part)
    members, spread = _merge_ensemble_fields(chunks, parts, bodies)
    attributes = [a for part in parts for a in part.attributes or []]
    return ScoreResult(
        model=model,
        rewards=rewards,
        truncated=sorted(truncated),
        usage=Usage(input_tokens=tokens),
        member_rewards=members,
        spread=spread,
        attributes=attributes if len(attributes) == len(rewards) and attributes else None,
        batch_invariant=bool(parts) and all(part.batch_invariant for part in parts),
    )


def _merge_ensemble_fields(
    chunks: list[Chunk], parts: list[ScoreResult], bodies: list[Any]
) -> tuple[dict[str, list[float]] | None, list[float] | None]:
    """Each chunk's ``member_rewards`` and ``spread`` joined in chunk order (so in input order).

    Every chunk of a call names the same model, so either every answer carries the ensemble fields, with the same
    members, or none does; anything else is an unexpected answer, reported rather than papered over.
    """
    if not parts:
        return None, None
    shapes = [_ensemble_shape(part) for part in parts]
    for chunk, shape, body in zip(chunks, shapes, bodies, strict=True):
        if shape != shapes[0]:
            raise APIResponseValidationError(
                f"the answer for items[{chunk.start}:{chunk.stop}] has ensemble fields {shape}, the answer for "
                f"items[{chunks[0].start}:{chunks[0].stop}] {shapes[0]}",
                body=body,
            )
    for chunk, part, body in zip(chunks, parts, bodies, strict=True):
        for name, values in (part.member_rewards or {}).items():
            _check_count(f"member_rewards[{name!r}] values", len(values), chunk, body)
        if part.spread is not None:
            _check_count("spread values", len(part.spread), chunk, body)
    first = parts[0]
    members = None
    if first.member_rewards is not None:
        members = {name: [v for part in parts for v in part.member_rewards[name]] for name in first.member_rewards}
    spread = None if first.spread is None else [v for part in parts for v in part.spread]
    return members, spread


def _ensemble_shape(part: ScoreResult) -> str:
    members = "none" if part.member_rewards is None else str(sorted(part.member_rewards))
    return f"(member_rewards: {members}, spread: {'yes' if part.spread is not None else 'none'})"


def score_call(items: Iterable[Item], *, normalize: bool, model: str | None, max_items: int) -> Call[ScoreResult]:
    """One request per run of up to ``max_items`` items of one form (a request holds one form; a call may mix
    them: each contiguous run of a form gets its own requests, and the rewards come back in input order)."""
    items = [dict(item) for item in _as_list("items", items)]
    options = _options(normalize, model)
    chunks: list[Chunk] = []
    for first, last in _form_runs(items):
        for a, b in plan_chunks([1] * (last - first), max_items):
            chunks.append(Chunk(first + a, first + b, {"items": items[first + a : first + b], **options}))
    return Call("POST", "/v1/score", chunks, _merge_score, "items")


def _form_runs(items: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """``(start, stop)`` of each contiguous run of items with the same keys (the server tells forms by keys)."""
    runs: list[tuple[int, int]] = []
    for i, item in enumerate(items):
        if runs and set(items[runs[-1][0]]) == set(item):
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


# --- /v1/preference


class _PreferenceResponse(BaseModel):
    results: list[PreferenceResult]


_merge_preference = _concatenated(_PreferenceResponse, "results")


def preference_call(
    prompts: Iterable[Prompt],
    responses_a: Iterable[str],
    responses_b: Iterable[str],
    *,
    normalize: bool,
    model: str | None,
    max_items: int,
) -> Call[list[PreferenceResult]]:
    prompts, a, b = (
        _as_list("prompts", prompts),
        _as_list("responses_a", responses_a),
        _as_list("responses_b", responses_b),
    )
    _same_length(prompts=prompts, responses_a=a, responses_b=b)
    pairs = [
        {"prompt": _prompt(p), "response_a": ra, "response_b": rb} for p, ra, rb in zip(prompts, a, b, strict=True)
    ]
    # Each pair is two sequences for the model, so it counts twice against the per-request item limit.
    chunks = _chunks("pairs", pairs, [2] * len(pairs), max_items, _options(normalize, model))
    return Call("POST", "/v1/preference", chunks, _merge_preference, "pairs")


# --- /v1/rerank


class _RerankResponse(BaseModel):
    results: list[RerankResult]


_merge_rerank = _concatenated(_RerankResponse, "results")


def rerank_call(
    prompts: Iterable[Prompt],
    groups_of_responses: Iterable[Iterable[str]],
    *,
    top_k: int | None,
    normalize: bool,
    model: str | None,
    max_items: int,
) -> Call[list[RerankResult]]:
    prompts = _as_list("prompts", prompts)
    groups = [_as_list("each group of responses", g) for g in _as_list("groups_of_responses", groups_of_responses)]
    _same_length(prompts=prompts, groups_of_responses=groups)
    bodies = [{"prompt": _prompt(p), "responses": g} for p, g in zip(prompts, groups, strict=True)]
    # Groups are never split (the ranking is per group); a chunk holds whole groups up to the item limit.
    weights = [max(len(g), 1) for g in groups]
    chunks = _chunks("groups", bodies, weights, max_items, _options(normalize, model, top_k=top_k))
    return Call("POST", "/v1/rerank", chunks, _merge_rerank, "groups")


# --- /v1/steps


class _StepsResponse(BaseModel):
    results: list[StepResult]


_merge_steps = _concatenated(_StepsResponse, "results")


def steps_call(
    prompts: Iterable[Prompt],
    solutions: Iterable[Iterable[str]],
    *,
    aggregate: str,
    model: str | None,
    max_items: int,
) -> Call[list[StepResult]]:
    prompts = _as_list("prompts", prompts)
    solutions = [_as_list("each solution's steps", s) for s in _as_list("solutions", solutions)]
    _same_length(prompts=prompts, solutions=solutions)
    items = [{"prompt": _prompt(p), "steps": s} for p, s in zip(prompts, solutions, strict=True)]
    extra = {"aggregate": aggregate, **({"model": model} if model is not None else {})}
    chunks = _chunks("items", items, [1] * len(items), max_items, extra)
    return Call("POST", "/v1/steps", chunks, _merge_steps, "items")


# --- /v1/score, a judge's label probabilities (SGLang's body)


class _LabelScoresResponse(BaseModel):
    scores: list[list[float]]


_merge_label_scores = _concatenated(_LabelScoresResponse, "scores")


def label_scores_call(
    query: str | Sequence[int],
    items: Iterable[str] | Iterable[Sequence[int]],
    label_token_ids: Iterable[int],
    *,
    apply_softmax: bool,
    item_first: bool,
    model: str | None,
    max_items: int,
) -> Call[list[list[float]]]:
    """Per item, the judge's next-token probability of each label id at the end of ``query + item``."""
    items = [item if isinstance(item, str) else list(item) for item in _as_list("items", items)]
    labels = _as_list("label_token_ids", label_token_ids)
    extra = {
        "query": query if isinstance(query, str) else list(query),
        "label_token_ids": labels,
        "apply_softmax": apply_softmax,
        "item_first": item_first,
        **({"model": model} if model is not None else {}),
    }
    chunks = _chunks("items", items, [1] * len(items), max_items, extra)
    return Call("POST", "/v1/score", chunks, _merge_label_scores, "items")


# --- operational routes


class _ModelList(BaseModel):
    data: list[ModelInfo]


def models_call() -> Call[list[ModelInfo]]:
    return Call("GET", "/v1/models", [Chunk(0, 0, None)], lambda _, bodies: _validate(_ModelList, bodies[0]).data)


class _SleepState(BaseModel):
    is_sleeping: bool


def _is_sleeping(_: list[Chunk], bodies: list[Any]) -> bool:
    return _validate(_SleepState, bodies[0]).is_sleeping


def sleep_call(level: int) -> Call[bool]:
    """``POST /sleep?level=``: 1 (weights to host memory, caches dropped) or 2 (weights dropped)."""
    if isinstance(level, bool) or level not in (1, 2):
        raise ValueError(f"level must be 1 or 2, got {level!r}")
    return Call("POST", f"/sleep?level={level}", [Chunk(0, 0, None)], _is_sleeping)


def wake_up_call() -> Call[bool]:
    return Call("POST", "/wake_up", [Chunk(0, 0, None)], _is_sleeping)


def is_sleeping_call() -> Call[bool]:
    return Call("GET", "/is_sleeping", [Chunk(0, 0, None)], _is_sleeping)


def probe_call(path: str) -> Call[bool]:
    """``/health`` or ``/ready``: any 2xx is a yes, whatever the body."""
    return Call("GET", path, [Chunk(0, 0, None)], lambda _, __: True)


# --- errors of later chunks


def rebase_error(error: APIStatusError, key: str | None, offset: int) -> APIStatusError:
    """Make the ``param`` of a chunk starting at ``offset`` name the position in the whole call.

    ``param`` is a path in the caller's request (``items[3].response``, ``pairs[1].response_a``): its first
    index is shifted by ``offset``; the server starts the message with the same path, which follows it.
    """
    if key is None or offset == 0 or not error.param or not error.param.startswith(f"{key}["):
        return error
    index_text, bracket, rest = error.param[len(key) + 1 :].partition("]")
    if not bracket or not index_text.isdigit():
        return error
    old, new = error.param, f"{key}[{int(index_text) + offset}]{rest}"
    error.param = new
    if error.message.startswith(old):
        error.message = new + error.message[len(old) :]
        error.args = (error.message,)
    return error
