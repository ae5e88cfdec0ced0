"""``RewardModel``: a formatter, an engine and a normalisation — the object users score with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .engine import ScoringEngine
from .errors import InvalidRequestError, RMServeError
from .formatting import ItemFormatter, TokenizedItem
from .items import Item
from .reward_formats import RewardFormat
from .spec import ModelSpec


@dataclass(frozen=True)
class Normalization:
    """Affine normalisation ``(r - mean) / std`` of raw rewards."""

    mean: float
    std: float

    def apply(self, reward: float) -> float:
        return (reward - self.mean) / self.std


class RewardModel:
    """A loaded reward model. Build it with ``load_reward_model``.

    Example::

        rm = load_reward_model("demo")
        rm.score([{"prompt": "Hi", "response": "Hello, happy to help."}])   # raw rewards
        rm.score(items, normalize=True)   # (r - mean) / std when the checkpoint defines them
    """

    def __init__(
        self,
        *,
        spec: ModelSpec,
        model_id: str,
        formatter: ItemFormatter,
        engine: ScoringEngine,
        dtype: str,
        head_name: str,
        normalization: Normalization | None,
        path: Path,
        reward_format: RewardFormat | None = None,
    ):
        self.spec = spec
        self.model_id = model_id
        self.formatter = formatter
        self.engine = engine
        self.dtype = dtype
        self.head_name = head_name
        self.normalization = normalization
        self.path = path
        self.reward_format = reward_format or RewardFormat("outcome", False, 1, "raw")

    @property
    def tokenizer(self):
        return self.formatter.tokenizer

    @property
    def max_length(self) -> int:
        return self.formatter.max_length

    def info(self) -> dict:
        """What ``GET /v1/models`` reports for this model."""
        norm = None if self.normalization is None else {"mean": self.normalization.mean, "std": self.normalization.std}
        info = {
            "id": self.model_id,
            "dtype": self.dtype,
            "quantization": self.spec.quantization,
            "batch_invariant": self.engine.batch_invariant,
            "max_length": self.max_length,
            "head": self.head_name,
            "normalization": norm,
            "template": self.formatter.template_name,
            "path": str(self.path),
            "kind": self.reward_format.kind,
        }
        if self.reward_format.attributes:  # a multi-attribute head: each attribute's weight in the reward
            info["attributes"] = dict(zip(self.reward_format.attributes, self.reward_format.weights, strict=True))
        if self.reward_format.name == "verdict-judge":  # reads label probabilities (SGLang's /v1/score body)
            info["judge"] = "pairwise" if self.spec.verdict_pair_template is not None else "pointwise"
            info["verdict_tokens"] = list(self.reward_format.label_tokens or ())
        if self.reward_format.process:  # vLLM's STEP pooling gives the head's probabilities: how many, which is ours
            fmt = self.reward_format
            info.update(step_separator=fmt.step_separator, step_outputs=fmt.outputs, step_label=fmt.label)
        return info

    def tokenize(self, item: Item | dict, index: int = 0) -> TokenizedItem:
        """Validate, format and tokenize one item (raises a typed error that names ``index``)."""
        return self.formatter.encode(item, index)

    def score_tokenized(self, items: Sequence[TokenizedItem]) -> list[float]:
        """Raw rewards for tokenized items; raises the first item error."""
        outcomes = self.engine.score_batch([t.input_ids for t in items])
        for outcome in outcomes:
            if isinstance(outcome, RMServeError):
                raise outcome
        return outcomes  # type: ignore[return-value]

    def score(self, items: Sequence[Item | dict], *, normalize: bool = False) -> list:
        """Rewards for items in any of the four forms, in input order (a process reward model: steps items, each
        getting its list of step rewards)."""
        tokenized = [self.tokenize(item, i) for i, item in enumerate(items)]
        rewards = self.score_tokenized(tokenized)
        return self.normalize(rewards) if normalize else rewards

    def warm_up(self) -> None:
        """One real forward before the model reports ready (a process reward model's: one step)."""
        if self.reward_format.process:
            self.score([{"prompt": "warm-up", "steps": ["warm-up"]}])
        else:
            self.score([{"text": "warm-up"}])

    def normalize(self, rewards: Sequence[float]) -> list[float]:
        if self.normalization is None:
            raise InvalidRequestError(
                f"model {self.model_id} has no normalisation configured (set reward_mean/reward_std, or add "
                "mean/std to its config.json)",
                param="normalize",
            )
        return [self.normalization.apply(r) for r in rewards]
