"""The I/O-free core shared by ``RewardClient`` and ``AsyncRewardClient``.

Everything that decides *what* to send and *what an answer means* lives here and in two helpers:
configuration, request building, retry decisions and status-to-exception mapping here; backoff
and ``Retry-After`` parsing in ``_retry``; chunking and merging per endpoint in ``_calls``. The two
clients only own the loop that sends, sleeps and fans chunks out (threads or asyncio), so the
behaviour cannot drift between them.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from . import _calls
from ._calls import Call, Chunk
from ._constants import (
    API_KEY_ENV,
    BASE_URL_ENV,
    DEFAULT_BASE_URL,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    MAX_CONCURRENCY,
    MAX_ITEMS_PER_REQUEST,
    USER_AGENT,
)
from ._retry import backoff_delay, is_retryable_status, parse_retry_after, retry_after_delay
from .errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ContextLengthExceededError,
    GatewayTimeoutError,
    InternalServerError,
    InvalidRequestError,
    NotReadyError,
    OverloadedError,
    RequestTooLargeError,
    RewardServerError,
    SleepingError,
    UnauthorizedError,
)
from .types import Item, PreferenceResult, Prompt, RerankResult, ScoreResult, StepResult

# A probe (health/ready) answers "no" rather than raising for these.
PROBE_FAILURES = (APIStatusError, APIConnectionError)

Timeout = float | httpx.Timeout | None

# --- error parsing ----------------------------------------------------------------------------

_BY_TYPE: dict[str, type[APIStatusError]] = {
    "invalid_request": InvalidRequestError,
    "context_length_exceeded": ContextLengthExceededError,
    "unauthorized": UnauthorizedError,
    "request_too_large": RequestTooLargeError,
    "overloaded": OverloadedError,
    "not_ready": NotReadyError,
    "sleeping": SleepingError,
    "timeout": GatewayTimeoutError,
    "internal": InternalServerError,
}
_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: InvalidRequestError,
    401: UnauthorizedError,
    413: RequestTooLargeError,
    422: InvalidRequestError,
    429: OverloadedError,
    503: NotReadyError,
    504: GatewayTimeoutError,
}


def error_class(status: int, error_type: str | None) -> type[APIStatusError]:
    """The exception class for a status and the body's ``error.type``."""
    # The body's type is the server's own word, so it wins; the status covers proxies and odd bodies.
    if error_type in _BY_TYPE:
        return _BY_TYPE[error_type]
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return InternalServerError if status >= 500 else APIStatusError


def make_status_error(status: int, content: bytes, headers: httpx.Headers | None = None) -> APIStatusError:
    """The exception for a non-2xx answer, from its status, raw body and headers.

    Reads API.md's ``{"error": {"message", "type", "code", "param"}}``; tolerates FastAPI's
    ``{"detail": ...}``, other JSON and non-JSON bodies (e.g. an HTML page from a proxy).
    """
    headers = headers if headers is not None else httpx.Headers()
    text = content.decode("utf-8", errors="replace")
    try:
        body: Any = json.loads(text) if text else None
    except ValueError:
        body = text
    error = body.get("error") if isinstance(body, dict) else None
    fields: dict[str, Any] = {}
    if isinstance(error, dict):
        message = str(error.get("message") or f"HTTP {status}")
        fields = {
            k: error.get(k)
            for k, kind in (("type", str), ("param", str), ("code", int))
            if isinstance(error.get(k), kind)
        }
    elif isinstance(body, dict) and "detail" in body:
        message = body["detail"] if isinstance(body["detail"], str) else json.dumps(body["detail"])
    else:
        message = text.strip()[:500] or f"HTTP {status}"
    return error_class(status, fields.get("type"))(
        message,
        status=status,
        request_id=headers.get("x-request-id"),
        body=body,
        headers=headers,
        retry_after=parse_retry_after(headers.get("retry-after"), cap=math.inf),
        **fields,
    )


# --- one attempt's outcome --------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What to do after one attempt: return ``payload``, raise ``error``, or sleep ``retry_in`` and retry."""

    payload: Any = None
    error: RewardServerError | None = None
    retry_in: float | None = None

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.payload


def _decode(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:  # e.g. a plain-text /health; the call's merge step decides whether that is fine
        return response.text


class BaseRewardClient:
    """Configuration, request building and retry decisions; the subclasses add only the I/O loop."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_items_per_request: int = MAX_ITEMS_PER_REQUEST,
        max_concurrency: int = MAX_CONCURRENCY,
        model: str | None = None,
        headers: Mapping[str, str] | None = None,
        rng: Callable[[], float] | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if max_items_per_request < 1 or max_concurrency < 1:
            raise ValueError("max_items_per_request and max_concurrency must be >= 1")
        # The environment is read here, at construction, never at import time.
        self.base_url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
        self._api_key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_items_per_request = max_items_per_request
        self.max_concurrency = max_concurrency
        self.model = check_model(model)
        self._extra_headers = dict(headers or {})
        self._rng = rng or random.random

    def __repr__(self) -> str:  # never shows the API key
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r})"

    # --- request building

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        headers.update(self._extra_headers)
        return headers

    def _build_request(self, call: Call[Any], chunk: Chunk, timeout: Timeout) -> httpx.Request:
        headers = self._headers()
        content = None
        if chunk.body is not None:
            content = json.dumps(chunk.body, separators=(",", ":"), allow_nan=False, default=_jsonable).encode()
            headers["Content-Type"] = "application/json"
        # httpx applies a timeout only through this extension, so every request carries one.
        timeout_ext = httpx.Timeout(timeout).as_dict()
        return httpx.Request(
            call.method,
            self.base_url + call.path,
            content=content,
            headers=headers,
            extensions={"timeout": timeout_ext},
        )

    def _resolve(self, timeout: Timeout, max_retries: int | None) -> tuple[Timeout, int]:
        """Per-call settings; ``None`` means the client's own."""
        retries = self.max_retries if max_retries is None else max_retries
        if retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {retries}")
        return (self.timeout if timeout is None else timeout), retries

    def _model_for(self, model: str | None) -> str | None:
        """The model a call names: its own ``model=``, else the client's (``None``: the server's first)."""
        return self.model if model is None else check_model(model)

    # --- calls (what each public method sends; see _calls)

    def _score_call(self, items: Iterable[Item], normalize: bool, model: str | None) -> Call[ScoreResult]:
        return _calls.score_call(
            items, normalize=normalize, model=self._model_for(model), max_items=self.max_items_per_request
        )

    def _pairs_call(
        self, prompts: Iterable[Prompt], responses: Iterable[str], normalize: bool, model: str | None
    ) -> Call[ScoreResult]:
        return self._score_call(_calls.pair_items(prompts, responses), normalize, model)

    def _preference_call(
        self, prompts: Iterable[Prompt], a: Iterable[str], b: Iterable[str], normalize: bool, model: str | None
    ) -> Call[list[PreferenceResult]]:
        return _calls.preference_call(
            prompts, a, b, normalize=normalize, model=self._model_for(model), max_items=self.max_items_per_request
        )

    def _rerank_call(
        self,
        prompts: Iterable[Prompt],
        groups: Iterable[Iterable[str]],
        top_k: int | None,
        normalize: bool,
        model: str | None,
    ) -> Call[list[RerankResult]]:
        return _calls.rerank_call(
            prompts,
            groups,
            top_k=top_k,
            normalize=normalize,
            model=self._model_for(model),
            max_items=self.max_items_per_request,
        )

    def _steps_call(
        self, prompts: Iterable[Prompt], solutions: Iterable[Iterable[str]], aggregate: str, model: str | None
    ) -> Call[list[StepResult]]:
        return _calls.steps_call(
            prompts, solutions, aggregate=aggregate, model=self._model_for(model), max_items=self.max_items_per_request
        )

    def _label_scores_call(
        self,
        query: str | Sequence[int],
        items: Iterable[str] | Iterable[Sequence[int]],
        label_token_ids: Iterable[int],
        apply_softmax: bool,
        item_first: bool,
        model: str | None,
    ) -> Call[list[list[float]]]:
        return _calls.label_scores_call(
            query,
            items,
            label_token_ids,
            apply_softmax=apply_softmax,
            item_first=item_first,
            model=self._model_for(model),
            max_items=self.max_items_per_request,
        )

    # --- retry decisions

    def _retry_delay(self, attempt: int, max_retries: int, headers: httpx.Headers | None) -> float | None:
        """Seconds to wait before the next attempt, or ``None`` when the retries are spent."""
        if attempt >= max_retries:
            return None
        advised = parse_retry_after(headers.get("retry-after")) if headers is not None else None
        return retry_after_delay(advised, self._rng) if advised is not None else backoff_delay(attempt, self._rng)

    def _outcome(
        self,
        call: Call[Any],
        chunk: Chunk,
        attempt: int,
        max_retries: int,
        *,
        response: httpx.Response | None = None,
        exc: httpx.TransportError | None = None,
    ) -> Outcome:
        """Judge attempt number ``attempt`` (0-based) of one chunk: its response, or the transport error."""
        if response is None:
            assert exc is not None
            delay = self._retry_delay(attempt, max_retries, None)
            if delay is not None:
                return Outcome(retry_in=delay)
            timed_out = isinstance(exc, httpx.TimeoutException)
            cls = APITimeoutError if timed_out else APIConnectionError
            what = "Request timed out" if timed_out else "Connection error"
            error = cls(f"{what}: {type(exc).__name__}: {exc}", request=_request_of(exc))
            error.__cause__ = exc
            return Outcome(error=error)
        if response.is_success:
            return Outcome(payload=_decode(response))
        if is_retryable_status(response.status_code):
            delay = self._retry_delay(attempt, max_retries, response.headers)
            if delay is not None:
                return Outcome(retry_in=delay)
        error = make_status_error(response.status_code, response.content, response.headers)
        return Outcome(error=_calls.rebase_error(error, call.param_key, chunk.start))


def check_model(model: Any) -> str | None:
    """``model`` unchanged when it is ``None`` or a non-empty string, else ``TypeError``/``ValueError`` naming the
    ``model`` argument (a request's ``model`` is a name: a model's id, path or served name, or an ensemble's)."""
    if model is None:
        return None
    if not isinstance(model, str):
        raise TypeError(f"model must be a model or ensemble name (str) or None, got {type(model).__name__}")
    if not model:
        raise ValueError("model must be a non-empty model or ensemble name, or None for the server's first model")
    return model


def _request_of(exc: httpx.TransportError) -> httpx.Request | None:
    try:
        return exc.request
    except RuntimeError:  # httpx raises this when the error was created without a request
        return None


def _jsonable(obj: Any) -> Any:
    # Trainers hand over numpy arrays / torch tensors of token ids; both have .tolist().
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")
