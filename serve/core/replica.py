"""One served model's scoring core, loaded and warmed up, and the ``LocalLink`` that reaches it from the HTTP edge in
the same process. The Ray runtime's ``Scorer`` deployment wraps the same ``load_scoring_core``.

Example::

    core = load_scoring_core(config, 0)                 # the first served model, warmed up
    service = GatewayService([LocalLink(core)], config)  # the edge calls the core directly: no Ray, no copy
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from rmserve.model import load_reward_model
from rmserve.model.errors import ModelLoadError
from rmserve.model.residency import weights_in_own_mappings
from rmserve.serve.config.resources import use_cores
from rmserve.serve.config.settings import ServerConfig
from rmserve.serve.core.scoring_core import ScoringCore

log = logging.getLogger("rmserve.serve")


def load_scoring_core(config: ServerConfig, model_index: int) -> ScoringCore:
    """Load served model ``model_index`` on as many torch threads as its CPUs, check what the configuration needs of
    it (normalisation for ``compat.normalize`` and for ensembles), run one real forward, and start its core."""
    if config.testing.scorer_start_delay_s:
        time.sleep(config.testing.scorer_start_delay_s)
    served = config.served_models()[model_index]
    threads = use_cores(served.num_cpus)
    with weights_in_own_mappings():  # so that sleep level 2 gives all of their memory back
        model = load_reward_model(served.spec(config.batching.max_batch_tokens))
    if served.name is not None:
        model.model_id = served.name  # requests and responses name it as the operator did
    if config.compat.normalize and model.normalization is None:
        raise ModelLoadError(
            f"compat.normalize is on but model {model.model_id} has no normalisation; set "
            "model.reward_mean and model.reward_std, or add mean/std to its config.json"
        )
    for ensemble in config.ensembles:
        if model.model_id in ensemble.members and model.normalization is None:
            raise ModelLoadError(
                f"model {model.model_id!r} is a member of ensemble {ensemble.name!r} but has no normalisation "
                "statistics; set its reward_mean and reward_std, or add mean/std to its config.json"
            )
    model.warm_up()  # one real forward before the model reports ready
    core = ScoringCore(model, config.batching, config.limits)  # after the warm-up: it is not traffic
    log.info("scorer ready (%d torch threads): %s", threads, model.info())
    return core


class LocalLink:
    """The edge's ``ScorerLink`` to a core in this process: a plain call, each request on its own (the core's queue
    is where requests meet; a caller that leaves cancels its own task, which takes its items out of the queue)."""

    def __init__(self, core: ScoringCore):
        self.core = core

    async def score(self, items: Sequence[Any], normalize: bool) -> Any:
        return await self.core.score_request(items, normalize)

    async def info(self) -> dict:
        return self.core.info()

    async def special_tokens(self) -> dict:
        return self.core.special_tokens()

    async def sleep(self, level: int) -> None:
        await self.core.sleep(level)

    async def wake_up(self) -> None:
        await self.core.wake_up()

    async def is_sleeping(self) -> bool:
        return self.core.is_sleeping()
