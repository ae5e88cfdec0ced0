"""rmserve.client — a light Python client for the rmserve reward-model server (needs only httpx and pydantic).

Usage::

    from rmserve.client import RewardClient

    with RewardClient(RMSERVE_URL) as client:  # or RewardClient() with RMSERVE_BASE_URL set
        rewards = client.score(["What is 2 + 2?", "Name a prime."], ["4", "9"])  # list[float], input order
        pair = client.preference(["What is 2 + 2?"], ["4"], ["5"])[0]  # pair.prob_a, pair.preferred
        best = client.rerank(["Name a prime."], [["9", "7", "4"]], top_k=1)[0].best_index

With asyncio, ``AsyncRewardClient`` has the same methods (``await client.score(...)``, ``async with``).
Long lists are chunked and sent concurrently; connection errors, 408, 429 and 5xx are retried with
backoff (503 ``sleeping`` too: a server put to sleep with ``client.sleep()`` answers it until ``client.wake_up()``);
other failures raise a ``RewardServerError`` subclass (see ``rmserve.client.errors``).
Importing this package never imports torch, transformers or ray.
"""

from ._async_client import AsyncRewardClient
from ._client import RewardClient
from ._constants import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, MAX_CONCURRENCY, MAX_ITEMS_PER_REQUEST
from .errors import (
    APIConnectionError,
    APIResponseValidationError,
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
from .types import ModelInfo, PreferenceResult, RankedResponse, RerankResult, ScoreResult, StepResult, Usage

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "MAX_CONCURRENCY",
    "MAX_ITEMS_PER_REQUEST",
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncRewardClient",
    "ContextLengthExceededError",
    "GatewayTimeoutError",
    "InternalServerError",
    "InvalidRequestError",
    "ModelInfo",
    "NotReadyError",
    "OverloadedError",
    "PreferenceResult",
    "RankedResponse",
    "RequestTooLargeError",
    "RerankResult",
    "StepResult",
    "RewardClient",
    "RewardServerError",
    "ScoreResult",
    "SleepingError",
    "UnauthorizedError",
    "Usage",
]
