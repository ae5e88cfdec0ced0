"""``ServerConfig``: every setting of the server in one validated pydantic model.

Sources, lowest to highest precedence: a YAML file < ``RMSERVE_*`` environment variables < CLI flags.
Unknown keys are rejected everywhere, with the key and where it came from in the message.

Environment variables name a field by its path, upper-cased, sections joined by a double
underscore: ``RMSERVE_PORT=9000``, ``RMSERVE_MODEL__PATH=/ckpt/rm``, ``RMSERVE_BATCHING__MAX_BATCH_TOKENS=8192``.
List fields take comma-separated values (``RMSERVE_API_KEYS=key1,key2``), mappings a JSON object
(``RMSERVE_RESOURCES={"rmserve_scorer": 1}``). ``RMSERVE_CONFIG`` names the
YAML file; the variables in ``NON_CONFIG_ENV`` belong to other parts of rmserve and are skipped.

Example::

    config = load_config(yaml_path="server.yaml", environ=os.environ, overrides={"port": 9000})
    config.batching.max_batch_tokens   # 16384 unless a source set it
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from rmserve.model.spec import ModelSpec
from rmserve.serve.config.served_models import (
    NAME_HELP,
    NOT_PER_MODEL,
    CpuCount,
    CustomResources,
    EnsembleConfig,
    GpuCount,
    ServedModel,
)

MIB = 1024 * 1024


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BatchingConfig(_Section):
    """Cross-request dynamic batching of the Scorer (changeable at runtime through ``user_config``)."""

    max_batch_tokens: int = Field(
        ModelSpec.model_fields["max_batch_tokens"].default,  # one default, the engine's (model/spec.py)
        ge=16,
        le=10_000_000,
        description="Token budget of one forward: the Scorer's queue takes waiting items while the engine's cost of "
        "the batch (padded tokens of its micro-batches plus their overhead, ScoringEngine.plan) fits it; also "
        "the engine's micro-batch budget. Larger means more throughput and more memory per forward.",
    )
    max_batch_items: int = Field(
        256, ge=1, le=65_536, description="Most items in one batch, whatever their length (bounds per-batch latency)."
    )
    batch_wait_timeout_s: float = Field(
        0.005,
        ge=0.0,
        le=10.0,
        description="When the engine is idle, the longest wait for more items after the first one arrived, if its "
        "last batch held items of several requests (a lone client's requests go at once; items that arrive during a "
        "forward go into the next one without waiting). Longer: bigger batches under light load, higher latency.",
    )
    gateway_window_s: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="How long a Gateway collects concurrent requests before sending them to the Scorer in one call. "
        "0 merges the requests ready in the same event-loop turn (no added latency). Fixed when a Gateway starts.",
    )


class RoutingConfig(_Section):
    """How a Gateway's calls are spread over a model's Scorer replicas (Ray Serve's request router)."""

    policy: Literal["prefix_affinity", "power_of_two"] = Field(
        "prefix_affinity",
        description="'prefix_affinity': calls whose items share a prompt go to the replica that computed it (a GRPO "
        "group's samples, best-of-n candidates), unless it is imbalance_items busier than the least-loaded one "
        "(rmserve.serve.rayserve.affinity.PrefixAffinityRouter); 'power_of_two': Ray Serve's default router.",
    )
    imbalance_items: int = Field(
        256,
        ge=0,
        le=10_000_000,
        description="Items in flight a replica may hold beyond the least-loaded one and still take a call for a "
        "prefix it holds; past it the least-loaded replica takes the call (and computes the prompt again).",
    )


class AutoscalingSettings(_Section):
    """Scorer replicas added and removed with load (``autoscaling.py``): each model's Scorer deployment runs between
    ``min_replicas`` and ``max_replicas``, aiming at ``target_queued_items`` items held per replica."""

    min_replicas: int = Field(1, ge=0, le=1024, description="Fewest Scorer replicas (per model).")
    max_replicas: int = Field(..., ge=1, le=1024, description="Most Scorer replicas (per model); resources are "
                              "sized and checked for this many.")  # fmt: skip
    target_queued_items: int = Field(
        512,
        ge=1,
        le=10_000_000,
        description="Items a replica holds (queued or in a batch) that the autoscaler aims at: more held in all "
        "means more replicas. About two full batches keeps a GPU busy without long queues.",
    )
    upscale_delay_s: float = Field(10.0, ge=0.0, le=3600.0, description="Load must ask for more for this long.")
    downscale_delay_s: float = Field(300.0, ge=0.0, le=86_400.0, description="Load must ask for fewer this long.")
    metrics_interval_s: float = Field(1.0, gt=0.0, le=600.0, description="How often replicas report what they hold.")
    look_back_period_s: float = Field(10.0, gt=0.0, le=3600.0, description="Window the reports are averaged over.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class LimitsConfig(_Section):
    """Request limits and load shedding (API.md's 413, 429 and 504 rows)."""

    max_items_per_request: int = Field(
        1024, ge=1, le=1_000_000, description="Most items in one request (pairs count 2, rerank groups their size)."
    )
    max_body_bytes: int = Field(32 * MIB, ge=1024, le=1024 * MIB, description="Largest request body in bytes.")
    max_queued_items: int = Field(
        8192,
        ge=1,
        le=10_000_000,
        description="Items a Scorer replica holds (queued or in a batch) before it answers 429 with Retry-After.",
    )
    request_timeout_s: float = Field(
        60.0, gt=0.0, le=3600.0, description="Deadline of one HTTP request, from arrival to response (504 past it)."
    )
    retry_after_s: int = Field(1, ge=1, le=3600, description="Seconds sent in the Retry-After header of a 429.")


class ScorerUserConfig(_Section):
    """The Scorer's ``user_config``: what ``reconfigure`` may change at runtime, without a restart."""

    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Dynamic batching.")
    max_queued_items: int = Field(8192, ge=1, le=10_000_000, description="See limits.max_queued_items.")


class TestingConfig(_Section):
    """Hooks for tests only; every one is off by default."""

    __test__ = False  # not a pytest test class

    fault_injection: bool = Field(False, description="Enable Scorer.set_faults (fault injection for tests).")
    scorer_start_delay_s: float = Field(
        0.0, ge=0.0, le=600.0, description="Sleep before loading the model (to observe the not-ready state)."
    )


class CompatConfig(_Section):
    """The compatibility routes for existing trainers (OpenRLHF's /get_reward, vLLM's /classify)."""

    normalize: bool = Field(
        False,
        description="Answer /get_reward and /classify with normalised rewards (r - mean) / std; OpenRLHF's trainer "
        "cannot normalise remote rewards itself. The model must define mean and std (config.json or "
        "model.reward_mean/reward_std), else the Scorer refuses to start.",
    )


class ServerConfig(_Section):
    """The whole server configuration (model, batching, limits, resources, network, access)."""

    model: ModelSpec = Field(
        default_factory=ModelSpec,
        description="The reward model to serve; with a `models` list, the defaults of every entry.",
    )
    served_model_names: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="More names a request's `model` may use for this model (as vLLM's --served-model-name), e.g. "
        "the name or path a trainer's config already sends. The model's id and its path always work. Single "
        "model only (entries of `models` have their own).",
    )
    models: list[ServedModel] = Field(
        default_factory=list,
        max_length=64,
        description="Several models, each with its own Scorer deployment: {name, path, dtype, ..., replicas, "
        "num_gpus, num_cpus}; the `model` section gives their defaults. Empty: serve `model` alone. A request's "
        "absent `model` means the first.",
    )
    ensembles: list[EnsembleConfig] = Field(
        default_factory=list,
        max_length=64,
        description="Named ensembles of served models: {name, members: {model: weight}, combine: mean | min | "
        "mean_minus_std, lambda}. Every member needs normalisation statistics.",
    )
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Dynamic batching.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Request limits and load shedding.")
    routing: RoutingConfig = Field(default_factory=RoutingConfig, description="Routing over Scorer replicas.")
    autoscaling: AutoscalingSettings | None = Field(
        None,
        description="Scale every model's Scorer replicas with load ({min_replicas, max_replicas, "
        "target_queued_items, ...}); replaces `replicas`. Unset: a fixed `replicas`.",
    )
    compat: CompatConfig = Field(default_factory=CompatConfig, description="Compatibility routes.")
    replicas: int = Field(1, ge=1, le=1024, description="Scorer replicas (each holds one copy of the model).")
    num_gpus: GpuCount = Field(
        "auto", description="GPUs reserved per Scorer replica; 'auto': 1 when the Ray node has a GPU, else 0."
    )
    num_cpus: CpuCount = Field(
        "auto",
        description="CPUs reserved per Scorer replica, and its torch threads (rounded up); 'auto': the Ray node's CPUs "
        "minus the Gateways' (and the models' that set theirs), shared among the replicas. A request the machine "
        "cannot hold fails at start.",
    )
    resources: CustomResources = Field(
        default_factory=dict,
        max_length=16,
        description="Custom Ray resources reserved per Scorer replica, to place the replicas on the nodes that declare "
        "them (`ray start --resources '{\"rmserve_scorer\": 100}'`), e.g. {rmserve_scorer: 1}. Environment: JSON, "
        "RMSERVE_RESOURCES='{\"rmserve_scorer\": 1}'. A resource no node has leaves the replicas pending.",
    )
    gateway_replicas: int = Field(1, ge=1, le=1024, description="HTTP gateway replicas.")
    gateway_num_cpus: float = Field(0.25, ge=0.0, le=1024.0, description="CPUs reserved per gateway replica.")
    gateway_resources: CustomResources = Field(
        default_factory=dict,
        max_length=16,
        description="Custom Ray resources reserved per Gateway replica and by the MetricsHub collector (placement, as "
        "`resources` for the Scorers), e.g. {rmserve_gateway: 1} declared on the head node only.",
    )
    runtime: Literal["ray", "inprocess"] = Field(
        "ray",
        description="What runs the server: 'ray' (Ray Serve: replicas, several models and nodes, autoscaling) or "
        "'inprocess' (one plain process, no Ray: one copy of each model on this machine; the least overhead per "
        "request, and it runs where Ray is not installed).",
    )
    host: str = Field("127.0.0.1", min_length=1, max_length=255, description="Address the HTTP server binds.")
    port: int = Field(8000, ge=1, le=65_535, description="Port the HTTP server binds.")
    ingress: Literal["auto", "direct", "proxy"] = Field(
        "auto",
        description="How `rmserve serve` receives HTTP: 'direct' = the Gateway replica itself listens on host:port "
        "(Ray Serve direct ingress: no proxy hop, 2-3x less CPU per request; one Gateway replica); 'proxy' = Ray "
        "Serve's HTTP proxy listens and forwards to the Gateways; 'auto' = direct when gateway_replicas is 1. "
        "`serve run`/KubeRay deployments always use Ray's proxy.",
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        max_length=1024,
        description="Accepted API keys (Authorization: Bearer <key>); empty: no authentication. Never logged.",
    )
    protect_operational_routes: bool = Field(
        False, description="Require the API key on /health, /ready and /v1/models too."
    )
    app_name: str = Field(
        "rmserve", min_length=1, max_length=128, description="Ray Serve application name (handles use it)."
    )
    ray_num_cpus: int | None = Field(
        None, ge=1, le=65_536, description="CPUs of the local Ray instance `rmserve serve` starts (default: all)."
    )
    ray_dashboard: bool = Field(False, description="Start the Ray dashboard with the local Ray instance.")
    access_log: bool = Field(
        False,
        description="Ray Serve's access log: one line per request in each replica's log. Off by default: it costs "
        "20-30% of single-item throughput on small machines; GET /metrics counts requests by route and status, "
        "and errors are logged either way.",
    )
    reward_window_items: int = Field(
        1024,
        ge=2,
        le=1_000_000,
        description="Reward telemetry: the latest rewards per model (in each Gateway) behind /metrics' rolling mean, "
        "spread and reward-length correlation.",
    )
    testing: TestingConfig = Field(default_factory=TestingConfig, description="Test hooks (off).")

    @model_validator(mode="before")
    @classmethod
    def _model_defaults(cls, data: Any) -> Any:
        """Entries of ``models`` start from the top-level ``model`` section (their own keys win)."""
        if not isinstance(data, dict) or not isinstance(data.get("models"), list):
            return data
        defaults = data.get("model") or {}
        if isinstance(defaults, ModelSpec):
            defaults = defaults.model_dump(exclude_unset=True)
        if not isinstance(defaults, dict):
            return data
        entries = [{**defaults, **entry} if isinstance(entry, dict) else entry for entry in data["models"]]
        return {**data, "models": entries}

    @model_validator(mode="after")
    def _consistent(self) -> ServerConfig:
        if "max_batch_tokens" in self.model.model_fields_set:
            raise ValueError("set batching.max_batch_tokens, not model.max_batch_tokens (one budget for both)")
        self._check_models()
        if self.limits.max_items_per_request > self.limits.max_queued_items:
            raise ValueError(
                f"limits.max_items_per_request ({self.limits.max_items_per_request}) exceeds limits.max_queued_items "
                f"({self.limits.max_queued_items}); such a request could never be admitted"
            )
        if self.ingress == "direct" and self.gateway_replicas > 1:
            raise ValueError(
                f"ingress 'direct' serves through one Gateway replica, not {self.gateway_replicas}; use ingress "
                "'proxy' (or 'auto') for several"
            )
        return self

    def _check_models(self) -> None:
        if self.models and self.served_model_names:
            raise ValueError("served_model_names applies to a single model; give each entry of models its own")
        taken: dict[str, str] = {}
        for i, entry in enumerate(self.models):
            if NOT_PER_MODEL & entry.model_fields_set:
                raise ValueError(f"models[{i}]: set batching.max_batch_tokens, not a model's max_batch_tokens")
            if entry.name is None:
                raise ValueError(f"models[{i}].name is required in a models list ({NAME_HELP})")
            if entry.name in taken:
                raise ValueError(f"models[{i}].name {entry.name!r} is already the name of {taken[entry.name]}")
            taken[entry.name] = f"models[{i}]"
        for i, ensemble in enumerate(self.ensembles):
            if ensemble.name in taken:
                raise ValueError(f"ensembles[{i}].name {ensemble.name!r} is already the name of {taken[ensemble.name]}")
            taken[ensemble.name] = f"ensembles[{i}]"
            models = [m.name for m in self.models] if self.models else []
            for member in ensemble.members:
                if member not in models:
                    raise ValueError(
                        f"ensembles[{i}].members: {member!r} is not the name of a served model (served: {models}; an "
                        "ensemble needs a models list with named entries)"
                    )
        for i, entry in enumerate(self.models):
            for name in entry.served_model_names:
                if name in taken and name != entry.name:
                    raise ValueError(f"models[{i}].served_model_names: {name!r} is already the name of {taken[name]}")

    def served_models(self) -> list[ServedModel]:
        """Every served model, first the default one, each with its replicas and resources filled in."""
        if not self.models:
            fields = self.model.model_dump(exclude_unset=True)
            return [
                ServedModel.model_validate(
                    {
                        **fields,
                        "served_model_names": self.served_model_names,
                        "replicas": self.autoscaling.max_replicas if self.autoscaling else self.replicas,
                        "num_gpus": self.num_gpus,
                        "num_cpus": self.num_cpus,
                        "resources": self.resources,
                    }
                )
            ]
        replicas = self.autoscaling.max_replicas if self.autoscaling else self.replicas  # resources fit the most
        server = {
            "replicas": replicas,
            "num_gpus": self.num_gpus,
            "num_cpus": self.num_cpus,
            "resources": self.resources,
        }
        return [
            entry.model_copy(update={k: v for k, v in server.items() if getattr(entry, k) is None})
            for entry in self.models
        ]

    def uses_direct_ingress(self) -> bool:
        return self.ingress == "direct" or (self.ingress == "auto" and self.gateway_replicas == 1)

    def model_spec(self, index: int = 0) -> ModelSpec:
        """The ``ModelSpec`` a replica of served model ``index`` loads, with the batching token budget."""
        return self.served_models()[index].spec(self.batching.max_batch_tokens)

    def scorer_user_config(self) -> dict:
        """What the Scorer's ``reconfigure`` receives (JSON-serialisable; changeable without a restart)."""
        tuning = ScorerUserConfig(batching=self.batching, max_queued_items=self.limits.max_queued_items)
        return tuning.model_dump(exclude={"batching": {"gateway_window_s"}})  # read by the Gateways only

    def api_key_values(self) -> list[str]:
        return [key.get_secret_value() for key in self.api_keys]
