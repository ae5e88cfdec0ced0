"""The models one application serves and its ensembles: the ``models:`` and ``ensembles:`` sections of the config.

A server with no ``models`` list serves one model, described by the top-level ``model`` section and the
``served_model_names`` / ``replicas`` / ``num_gpus`` / ``num_cpus`` / ``resources`` fields, exactly as before. With a
``models`` list it serves each entry with its own Scorer deployment; an entry is a ``ModelSpec`` plus a ``name``
and how it is deployed, and the top-level ``model`` section gives every entry its defaults (an entry's own keys win)::

    model: {dtype: fp32}                 # defaults of every entry
    models:
      - {name: helpful, path: /ckpt/a}
      - {name: safe, path: /ckpt/b, dtype: bf16, replicas: 2, num_gpus: 1}
    ensembles:
      - {name: both, members: {helpful: 1.0, safe: 1.0}, combine: mean_minus_std, lambda: 0.5}

On the command line: ``rmserve serve --model helpful=/ckpt/a --model safe=/ckpt/b``.

An ensemble's name is a model name like any other; see ``ensemble.py`` for how its reward is computed.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from rmserve.model.spec import ModelSpec

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
NAME_HELP = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64 characters"
Combine = Literal["mean", "min", "mean_minus_std"]
GpuCount = Annotated[float, Field(ge=0.0, le=64.0)] | Literal["auto"]
CpuCount = Annotated[float, Field(ge=0.01, le=1024.0)] | Literal["auto"]
# Custom Ray resources a replica reserves (``ray start --resources '{"rmserve_scorer": 100}'`` declares them on a node).
CustomResources = dict[
    Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,127}$")], Annotated[float, Field(ge=0.0, le=1e9)]
]
# ModelSpec fields an entry of ``models`` may not set (the batching section owns the token budget).
NOT_PER_MODEL = frozenset({"max_batch_tokens"})


class ServedModel(ModelSpec):
    """One served model: how to load it (every ``ModelSpec`` field) and how it is named and deployed.

    ``None`` in ``replicas`` / ``num_gpus`` / ``num_cpus`` / ``resources`` means the server's top-level value.

    Example::

        ServedModel(name="helpful", path="/ckpt/a", dtype="fp32", replicas=2)
    """

    name: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="The model's id in requests and responses (its `model`). Required in a `models` list; a single "
        "model without a name takes its checkpoint's (the directory name, 'rmserve-demo' for the demo).",
    )
    served_model_names: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="More names a request's `model` may use for this model (e.g. what a trainer already sends).",
    )
    replicas: int | None = Field(None, ge=1, le=1024, description="Scorer replicas of this model (default: replicas).")
    num_gpus: GpuCount | None = Field(None, description="GPUs per replica of this model (default: num_gpus).")
    num_cpus: CpuCount | None = Field(None, description="CPUs per replica of this model (default: num_cpus).")
    resources: CustomResources | None = Field(
        None, max_length=16, description="Custom Ray resources per replica of this model (default: resources)."
    )

    def spec(self, max_batch_tokens: int) -> ModelSpec:
        """The ``ModelSpec`` a replica loads, with the batching section's token budget."""
        fields = self.model_dump(include=set(ModelSpec.model_fields))
        return ModelSpec.model_validate({**fields, "max_batch_tokens": max_batch_tokens})


class EnsembleConfig(BaseModel):
    """A named combination of served models; a request's ``model`` may name it like any model.

    Example::

        EnsembleConfig(name="both", members={"helpful": 1.0, "safe": 1.0}, combine="mean_minus_std", lambda_=0.5)
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(pattern=NAME_PATTERN, description="The ensemble's name (a request's `model`).")
    members: dict[str, Annotated[float, Field(gt=0.0, le=1e6)]] = Field(
        min_length=1,
        max_length=64,
        description="Served model name -> weight (> 0). Weights are relative: they enter the weighted mean and the "
        "weighted spread; `min` ignores their size (see rmserve.serve.routing.ensemble).",
    )
    combine: Combine = Field(
        "mean",
        description="'mean': weighted mean of the members' normalised rewards; 'min': the lowest of them; "
        "'mean_minus_std': weighted mean minus lambda times their weighted standard deviation.",
    )
    lambda_: float = Field(
        1.0, alias="lambda", ge=0.0, le=1000.0, description="The uncertainty penalty of 'mean_minus_std'."
    )
