"""``RayLink``: the HTTP edge's ``ScorerLink`` to a Scorer deployment: the one place where a request crosses Ray.

A score call goes through the Gateway's ``RequestCoalescer`` (the requests that reach a Gateway together share one
handle call: a Ray call costs far more CPU than scoring one short item). Ray's own failures become the API's errors
here, so nothing past this module knows Ray: a task error is unwrapped to the ``RMServeError`` it carries, back
pressure is 429 ``overloaded``, and a replica that is gone is 503 ``not_ready`` (retryable).

Sleep and wake reach every replica of the deployment, not one: they go to the application's ``MetricsHub``, whose
``SleepBoard`` every Scorer replica watches (``sleep_board.py``), and return once each live replica acknowledged.

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

from rmserve.model.errors import InternalError, NotReadyError, OverloadedError, RequestTimeoutError, RMServeError
from rmserve.serve.config.settings import ServerConfig
from rmserve.serve.rayserve.coalescing import RequestCoalescer
from rmserve.serve.rayserve.metrics_hub import HUB_DEPLOYMENT


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
        # The most a sleep or wake waits for the replicas: inside the HTTP deadline, so its answer says who is late.
        self.sleep_timeout_s = 0.9 * config.limits.request_timeout_s
        self._hub: Any = None
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

    async def sleep(self, level: int) -> None:
        await self._set_sleep_level(level, "fall asleep")

    async def wake_up(self) -> None:
        await self._set_sleep_level(0, "wake up")

    async def is_sleeping(self) -> bool:
        levels = await self._call("sleep_levels", self.scorer.deployment_name, target=self._sleep_board())
        return bool(levels) and all(levels)

    async def _set_sleep_level(self, level: int, verb: str) -> None:
        deployment = self.scorer.deployment_name
        answer = await self._call(
            "set_sleep_level", deployment, level, self.sleep_timeout_s, target=self._sleep_board()
        )
        replicas, acknowledged, errors = answer["replicas"], answer["acknowledged"], answer["errors"]
        if errors:
            if isinstance(errors[0], dict):  # the replica's own 4xx (e.g. a level it cannot sleep at), as it answered
                raise _from_body(errors[0])
            raise InternalError(f"{len(errors)} of {replicas} replicas of {deployment} did not {verb}: {errors[0]}")
        if not replicas or acknowledged < replicas:
            raise RequestTimeoutError(
                f"{acknowledged} of {replicas} replicas of {deployment} acknowledged within {self.sleep_timeout_s} s; "
                "the others follow when they can (GET /is_sleeping tells when all sleep)"
            )

    def _sleep_board(self) -> Any:
        """The application's ``MetricsHub`` (it holds the ``SleepBoard``), found by name in the Scorer's application."""
        if self._hub is None:
            from ray import serve

            self._hub = serve.get_deployment_handle(HUB_DEPLOYMENT, app_name=self.scorer.app_name)
        return self._hub

    async def _call(self, method: str, *args: Any, target: Any = None) -> Any:
        """One handle call (to the Scorer, or ``target``); when the caller stops waiting (its timeout), the call is
        cancelled in the replica too."""
        response = getattr(target if target is not None else self.scorer, method).remote(*args)
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as exc:
            raise from_ray(exc) from None


def _from_body(body: dict) -> RMServeError:
    """The error a replica answered, rebuilt from its API body (``{"message", "type", "code", "param"}``)."""
    err = RMServeError(body["message"], param=body.get("param"))
    err.status, err.type = body["code"], body["type"]
    return err
