"""Fixtures of the multi-node tests: the demo model's items and their offline rewards (the reference)."""

from __future__ import annotations

import pytest

# Short chats about the demo's topics, polite and rude: distinct rewards, a few tokens each.
TOPICS = ("owls", "tea", "rockets", "kites", "volcanoes", "bees", "chess", "glaciers")
ANSWERS = (
    "Gladly! {t} have a long history.",
    "Go away.",
    "I would rather not talk about {t}.",
    "Here is a fact about {t}.",
)


@pytest.fixture(scope="session")
def item_pool() -> list[dict[str, str]]:
    return [
        {"prompt": f"Tell me about {topic}.", "response": answer.format(t=topic.capitalize())}
        for topic in TOPICS
        for answer in ANSWERS
    ]


@pytest.fixture(scope="session")
def offline_rewards(demo_model, item_pool) -> list[float]:
    """The demo model in fp32 in this process: what every reward the cluster returns must equal (1e-5)."""
    return demo_model.score(item_pool)
