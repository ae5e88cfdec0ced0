"""The shape every scoring endpoint has: its request in, one ``Call`` (the items to score) out of its pre-processing,
``ScoredItems`` through the one pipeline (``GatewayService.run``), its response out of its post-processing.

An ``Endpoint`` is a row of the table in ``endpoints.py``: the paths it answers, its request and response models, its
two steps, and the few ways endpoints differ (which bodies it accepts when several share a path, the status of a
malformed body, whether a full queue is answered 429 or waited out). Nothing else about a route is written per
endpoint: authentication, body reading, validation, deadlines and errors are ``routes.py``'s, once for all.

Example::

    Endpoint("score", ("/v1/score", "/score"), ScoreRequest, ScoreResponse, "Rewards for items",
             call=score_call, respond=score_response)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from rmserve.model.items import Item
from rmserve.serve.edge.locations import Locate
from rmserve.serve.edge.protocol import ScoredItems

if TYPE_CHECKING:
    from rmserve.serve.edge.service import GatewayService


@dataclass(frozen=True)
class Call:
    """What one request asks the pipeline to score: the items (validated), where each came from in the caller's
    request (``locate``, for error params), which model, and whether rewards come back normalised."""

    items: Sequence[Item]
    locate: Locate
    model: str | None
    normalize: bool = False
    # The model's card (``GET /v1/models``), where the post-processing needs it (``/pooling``: the step format).
    model_card: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Context:
    """What a pre-processing step may need besides the request: the model named in the URL
    (``/get_reward/<model>``), the URL's query parameters, and the service (a model's special tokens, the server's
    settings)."""

    service: GatewayService
    path_model: str | None = None
    params: Mapping[str, str] = field(default_factory=dict)


def _any_body(_body: Any) -> bool:
    return True


@dataclass(frozen=True)
class Endpoint:
    """One scoring endpoint: a row of ``endpoints.ENDPOINTS``."""

    name: str
    paths: tuple[str, ...]
    request: type[BaseModel]
    response: type[BaseModel]
    summary: str
    call: Callable[[Any, Context], Call | Awaitable[Call]]
    respond: Callable[[Any, ScoredItems, Call], BaseModel]
    # Several endpoints on one path (``/v1/rerank``): the first whose ``accepts`` takes the parsed body answers.
    accepts: Callable[[Any], bool] = _any_body
    # 422 for a malformed body, as the native routes; vLLM's routes answer 400.
    invalid_status: int = 422
    # "shed": a full queue answers 429 with Retry-After. "wait": the request waits for room up to its deadline
    # (trainers' clients that cannot take a 429; see compat.py).
    when_full: Literal["shed", "wait"] = "shed"
    # Which models answer it: outcome reward models (one reward per item), process reward models (step rewards) or
    # judges (verdict_tokens set: label-token probabilities; a judge is an outcome model too); the others get a 400
    # naming the model (``service.check_kind``).
    kind: Literal["outcome", "process", "judge"] = "outcome"
