"""rmserve.model — load, format, tokenize and score reward models. No Ray, no HTTP in here.

Example::

    from rmserve.model import load_reward_model
    rm = load_reward_model("demo")
    rm.score([{"prompt": "Tell me about tea.", "response": "Gladly! Tea is a drink brewed from leaves."}])
"""

from .engine import BatchPlan, EngineStats, ScoringEngine, last_token_index, padded_tokens, plan_microbatches
from .errors import (
    ContextLengthExceededError,
    InternalError,
    InvalidRequestError,
    ItemTooLargeForMemoryError,
    ModelLoadError,
    RMServeError,
)
from .formatting import ItemFormatter, TokenizedItem, left_truncate
from .items import ConversationItem, Item, Message, PairItem, TextItem, TokensItem, parse_item
from .loading import load_reward_model
from .reward_model import Normalization, RewardModel
from .spec import ModelSpec

__all__ = [
    "BatchPlan",
    "ContextLengthExceededError",
    "ConversationItem",
    "EngineStats",
    "InternalError",
    "InvalidRequestError",
    "Item",
    "ItemFormatter",
    "ItemTooLargeForMemoryError",
    "Message",
    "ModelLoadError",
    "ModelSpec",
    "Normalization",
    "PairItem",
    "RMServeError",
    "RewardModel",
    "ScoringEngine",
    "TextItem",
    "TokenizedItem",
    "TokensItem",
    "last_token_index",
    "left_truncate",
    "load_reward_model",
    "padded_tokens",
    "parse_item",
    "plan_microbatches",
]
