"""Which served model or ensemble a request's ``model`` names (API.md, "Model names"), and what a Gateway keeps
per served model.

A server has one ``ModelLane`` per served model (its ``ScorerLink``: how requests reach the model's scoring core,
through Ray or in this process; its names and model card once probed) and one ``EnsembleRoute`` per ensemble (its
members' lanes).
``ModelRouter.find`` maps a request's ``model`` to one of them: absent means the first served model; otherwise an
ensemble's name, or a served model's id, ``served_model_names`` entry or path (as given or resolved; a path
matches with or without a trailing slash or ``./``).

Example::

    router = ModelRouter([link_a, link_b], config)
    router.find(None) is router.lanes[0]
    router.find("both")          # EnsembleRoute, when config.ensembles names "both"
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rmserve.serve.config.served_models import EnsembleConfig, ServedModel
from rmserve.serve.config.settings import ServerConfig


def model_names(served: ServedModel, model_id: str | None, loaded_from: str | None = None) -> list[str]:
    """Every name a request's ``model`` may use for ``served``: its id (when known), its ``served_model_names``, and
    the path it was loaded from, as given and resolved (verl sends its path), and the checkpoint directory a replica
    reports loading (``loaded_from``: what ``demo`` resolved to)."""
    path = served.path
    names = [*([model_id] if model_id else []), *served.served_model_names, path]
    if path != "demo":
        names.append(os.path.realpath(os.path.expanduser(path)))
    if loaded_from:
        names += [loaded_from, os.path.realpath(loaded_from)]
    return list(dict.fromkeys(names))


def names_model(names: Sequence[str], requested: str) -> bool:
    """Does ``requested`` name the model? A path matches with or without a trailing slash or ``./``."""
    return requested in names or os.path.normpath(requested) in {os.path.normpath(n) for n in names}


class ScorerLink(Protocol):
    """How the HTTP edge reaches one served model's scoring core: ``core.replica.LocalLink`` in this process,
    ``rayserve.link.RayLink`` through a Scorer deployment. Errors come back as ``RMServeError`` (a request's own
    error is returned, not raised)."""

    async def score(self, items: Sequence[Any], normalize: bool) -> Any:
        """A request's ``ScoredItems`` or its ``RMServeError``."""

    async def info(self) -> dict:
        """The model card (``GET /v1/models``)."""

    async def special_tokens(self) -> dict:
        """The tokenizer's special tokens as text."""

    async def sleep(self, level: int) -> None:
        """Put every replica of the model to sleep at ``level`` (1 or 2); returns once all of them sleep."""

    async def wake_up(self) -> None:
        """Wake every replica of the model; returns once all of them score again."""

    async def is_sleeping(self) -> bool:
        """True when every replica of the model sleeps."""


@dataclass(eq=False)
class ModelLane:
    """One served model as a Gateway sees it."""

    served: ServedModel
    link: ScorerLink
    model_id: str | None = None  # the operator's name; else the checkpoint's, known once probed
    info: dict | None = None  # the model card, once a replica answered
    special_tokens: dict | None = None
    names: list[str] = field(default_factory=list)

    def learn(self, info: dict) -> None:
        """Record the model card a replica answered with (its ``id`` and the checkpoint directory it loaded, e.g.
        the demo's, complete the names)."""
        self.info = info
        self.model_id = info["id"]
        self.names = model_names(self.served, self.model_id, info.get("path"))


@dataclass(eq=False)
class EnsembleRoute:
    """An ensemble and the lanes of its members (in ``members`` order)."""

    config: EnsembleConfig
    lanes: list[ModelLane]

    @property
    def name(self) -> str:
        return self.config.name


class ModelRouter:
    """The Gateway's served models (``lanes``, the first is the default) and ``ensembles``, found by name."""

    def __init__(self, links: Sequence[ScorerLink], config: ServerConfig):
        served = config.served_models()
        if len(links) != len(served):
            raise ValueError(f"{len(served)} served models need {len(served)} scorer links, got {len(links)}")
        self.lanes = [
            ModelLane(served=model, link=link, model_id=model.name, names=model_names(model, model.name))
            for model, link in zip(served, links, strict=True)
        ]
        by_name = {lane.model_id: lane for lane in self.lanes}
        self.ensembles = {
            e.name: EnsembleRoute(config=e, lanes=[by_name[member] for member in e.members]) for e in config.ensembles
        }

    def find(self, requested: str | None) -> ModelLane | EnsembleRoute | None:
        """The lane or ensemble ``requested`` names (None: the first lane); None when nothing has that name."""
        if requested is None:
            return self.lanes[0]
        if requested in self.ensembles:
            return self.ensembles[requested]
        for lane in self.lanes:  # exact names first: a path given as another model's alias still finds its owner
            if requested in lane.names:
                return lane
        for lane in self.lanes:
            if names_model(lane.names, requested):
                return lane
        return None

    def unknown_lanes(self) -> list[ModelLane]:
        """Lanes whose id is not known yet (a single model without a configured name, before its first probe)."""
        return [lane for lane in self.lanes if lane.model_id is None]

    def unprobed_lanes(self) -> list[ModelLane]:
        """Lanes no replica has described yet (their names lack the checkpoint directory a replica loaded)."""
        return [lane for lane in self.lanes if lane.info is None]

    def all_names(self) -> list[str]:
        names = [name for lane in self.lanes for name in lane.names]
        return list(dict.fromkeys([*names, *self.ensembles]))
