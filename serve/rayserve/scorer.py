"""The ``Scorer`` deployment: one reward model per replica, thin Ray wiring around ``ScoringCore``.

Everything a replica does with a request (admission and 429, the one batching queue, the forward thread, dropping
the items of callers that went away, rescoring a failed batch, stats) is ``scoring_core.ScoringCore``, testable
without Ray. This class loads the model, sizes torch's thread pool to the replica's CPUs, warms up, and exposes the
handle API.

A trainer inside the same Ray cluster skips HTTP::

    handle = serve.get_deployment_handle("Scorer", app_name="rmserve")
    rewards = await handle.score.remote([{"prompt": "2+2?", "response": "4"}])   # or .remote(...).result()
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from ray import serve

from rmserve.model import RewardModel
from rmserve.model.errors import InvalidRequestError, RMServeError
from rmserve.model.items import Item
from rmserve.serve.config.settings import ScorerUserConfig, ServerConfig
from rmserve.serve.core.faults import FaultPlan
from rmserve.serve.core.replica import load_scoring_core
from rmserve.serve.edge.protocol import ScoredItems
from rmserve.serve.metrics.store import Snapshot
from rmserve.serve.rayserve.autoscaling import QUEUED_ITEMS
from rmserve.serve.rayserve.metrics_hub import HubLink, start_reporting
from rmserve.serve.rayserve.sleep_board import start_following

log = logging.getLogger("rmserve.serve")


def scorer_deployment_name(config: ServerConfig, model_index: int) -> str:
    """``Scorer`` for the first (default) model, so handles to the default model keep their name; else
    ``Scorer-<name>``."""
    return "Scorer" if model_index == 0 else f"Scorer-{config.served_models()[model_index].name}"


@serve.deployment(name="Scorer")
class Scorer:
    """Scores items with one reward model; batches items across concurrent requests.

    An application serving several models has one Scorer deployment per model: the first model's is named
    ``Scorer``, the others ``Scorer-<name>`` (``scorer_deployment_name``).

    Methods callable through a ``DeploymentHandle``: ``score(items, normalize=False) -> list[float]``,
    ``score_request(items, normalize) -> ScoredItems``, ``score_requests`` / ``score_requests_streamed`` (a Gateway's
    merged calls, see ``rayserve.coalescing``) and ``withdraw`` (their callers that left), ``info()``,
    ``special_tokens()``, ``stats()``, ``metrics_snapshot()``, ``reconfigure``, ``set_faults``. Sleep and wake are not
    handle methods: a handle call reaches one replica, and they must reach all (``RayLink.sleep``, ``sleep_board``).
    """

    def __init__(self, config: ServerConfig, model_index: int, metrics_hub: HubLink):
        self._config = config
        self.core = load_scoring_core(config, model_index)
        self.model: RewardModel = self.core.model
        self._metrics_reporter = start_reporting(metrics_hub, "scorer", self.core.metrics_snapshot)
        # Sleep and wake reach every replica through the hub's board (the Gateway's RayLink posts them there).
        self._sleep_follower = start_following(metrics_hub, self.core)

    # -- handle API -------------------------------------------------------------------------------
    async def score(self, items: Sequence[Item | dict], normalize: bool = False) -> list[float]:
        """Rewards for ``items`` (any of the four forms, dicts or models), in input order; raises typed errors."""
        result = await self.core.score_request(items, normalize)
        if isinstance(result, RMServeError):
            raise result
        return result.shown

    async def score_request(
        self, items: Sequence[Item | dict], normalize: bool = False, request_id: str | None = None
    ) -> ScoredItems | RMServeError:
        """Rewards plus what the HTTP routes report (truncation, token usage).

        A request's error is returned, not raised, so expected 4xx answers do not fill the replica log with
        tracebacks; ``score`` raises it. Cancelling the call drops the items that have not reached a forward.
        """
        return await self.core.score_request(items, normalize, request_id)

    async def score_requests(self, requests: Sequence[tuple]) -> list[ScoredItems | RMServeError]:
        """``score_request`` for each ``(items, normalize, request_id)`` a Gateway merged into one call."""
        return await self.core.score_requests(requests)

    async def score_requests_streamed(self, requests: Sequence[tuple]):
        """``score_requests`` as a stream of ``(index, result)``, each request's as soon as it is ready (call it
        through ``handle.options(stream=True)``)."""
        async for indexed in self.core.score_requests_as_completed(requests):
            yield indexed

    def withdraw(self, request_ids: Sequence[str]) -> None:
        """Requests of a merged call whose callers went away: their waiting items are dropped, nobody else's."""
        self.core.withdraw(request_ids)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric: the items this replica holds (``autoscaling.QueuedItemsPolicy``)."""
        return {QUEUED_ITEMS: float(self.core.queued_items)}

    def info(self) -> dict:
        """The model card of ``GET /v1/models``."""
        return self.core.info()

    def special_tokens(self) -> dict[str, str | None]:
        """The tokenizer's special tokens as text (the compatibility routes strip padding with them)."""
        return self.core.special_tokens()

    def metrics_snapshot(self) -> Snapshot:
        """This replica's metrics; ``GET /metrics`` shows their sum over all replicas (see ``metrics_hub``)."""
        return self.core.metrics_snapshot()

    def stats(self) -> dict:
        """Counters of this replica: queue, rejections, dropped items, batches formed, engine totals, limits."""
        return {"pid": os.getpid(), **self.core.stats()}

    def reconfigure(self, user_config: dict) -> None:
        """Apply a new ``ScorerUserConfig`` (batching limits, queue limit) without restarting."""
        tuning = ScorerUserConfig.model_validate(user_config)
        self.core.configure(tuning.batching, tuning.max_queued_items)
        log.info("scorer reconfigured: %s", tuning.model_dump())

    def set_faults(self, **plan) -> None:
        """Test hook (needs ``testing.fault_injection``): see ``rmserve.serve.core.faults.FaultPlan``."""
        if not self._config.testing.fault_injection:
            raise InvalidRequestError("fault injection is disabled (testing.fault_injection is false)")
        self.core.set_faults(FaultPlan(**plan))

    def __del__(self) -> None:
        core = getattr(self, "core", None)
        if core is not None:
            core.close()
