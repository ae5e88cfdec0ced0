"""``RayLink``: the HTTP edge's ``ScorerLink`` to a Scorer deployment: the one place where a request crosses Ray.

A score call goes through the Gateway's ``RequestCoalescer`` (the requests that reach a Gateway together share one
handle call: a Ray call costs far more CPU than scoring one short item). Ray's own failures become the API's errors
here, so nothing past this module knows Ray: a task error is unwrapped to the ``RMServeError`` it carries, back
pressure is 429 ``overloaded``, and a replica that is gone is 503 ``not_ready`` (retryable).

Example::

    link = RayLink(serve.get_deployment_handle("Scorer", app_name="rmserve"), config)
    await link.score([{"prompt": "2+2?", "response": "4"}], normalize=False)   # ScoredItems | RMServeError
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from rmserve.model.errors import NotReadyError, OverloadedError, RMServeError
from rmserve.serve.config.settings import ServerConfig
from rmserve.serve.rayserve.coalescing import RequestCoalescer


def from_ray(exc: BaseException) -> BaseException:
    """The API's error for a failure of a Ray call (anything else is returned as it is)."""
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    if isinstance(exc, RMServeError):
        return exc
    if isinstance(exc, BackPressureError):
        return OverloadedError("the server is at capacity; retry later")
    if isinstance(exc, DeploymentUnavailableError | ActorDiedError | ActorUnavailableError):
        return NotReadyError("no scorer replica is available right now; retry shortly")
    return exc


class RayLink:
    """One served model's Scorer deployment as the edge sees it (``routing.model_routing.ScorerLink``)."""

    def __init__(self, scorer: Any, config: ServerConfig, *, split_by_prefix: bool = False):
        self.scorer = scorer
        self.coalescer = RequestCoalescer(
            scorer,
            window_s=config.batching.gateway_window_s,
            max_items=config.batching.max_batch_items,
            split_by_prefix=split_by_prefix,
        )

    async def score(self, items: Sequence[Any], normalize: bool) -> Any:
        try:
            result = await self.coalescer.submit(items, normalize)
        except Exception as exc:
            raise from_ray(exc) from None
        return from_ray(result) if isinstance(result, BaseException) else result

    async def info(self) -> dict:
        return await self._call("info")

    async def special_tokens(self) -> dict:
        return await self._call("special_tokens")

    async def _call(self, method: str) -> Any:
        """One handle call; when the caller stops waiting (its timeout), the call is cancelled in the replica too."""
        response = getattr(self.scorer, method).remote()
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as exc:
            raise from_ray(exc) from None
