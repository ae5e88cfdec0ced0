"""The demo's synthetic preference task: "answer the question that was asked, and be polite".

A prompt asks about one topic. The preferred response talks about that same topic in a polite
tone. A rejected response is worse in a way that can be read off the text: it talks about a
different topic (off-topic), is rude, or dodges the question. So the better response is always
decidable from the text, and a reward model must relate the response to the prompt to rank well.

Example::

    pairs = make_preference_pairs(1000, seed=0)   # [{"prompt", "chosen", "rejected"}, ...]
"""

from __future__ import annotations

import random

TOPICS = (
    "cats dogs rivers mountains tea coffee bread cheese trains bicycles rockets planets oceans forests "
    "volcanoes glaciers bees owls whales sharks tomatoes apples violins pianos chess poetry bridges castles "
    "deserts islands comets clouds rainbows lanterns kites sailboats gardens libraries museums robots"
).split()
FACTS = (
    "are fascinating to study",
    "have a long history",
    "can be surprisingly complex",
    "are loved by many people",
    "change with the seasons",
    "come in many varieties",
    "are worth learning about",
    "have inspired many stories",
)
PROMPTS = (
    "Tell me about {t}.",
    "What do you know about {t}?",
    "Can you explain {t} to me?",
    "I have a question about {t}.",
    "Please describe {t} briefly.",
    "Why are {t} interesting?",
)
POLITE = ("Gladly!", "Of course.", "Happy to help.", "Great question!", "Sure, thank you for asking.")
RUDE = ("Ugh, whatever.", "That is a stupid question.", "Go away.", "Figure it out yourself.", "Boring.")
EVASIVE = (
    "I do not know.",
    "No comment.",
    "Ask someone else.",
    "I would rather not say.",
    "Maybe, maybe not.",
)


def _good(rng: random.Random, topic: str) -> str:
    return f"{rng.choice(POLITE)} {topic.capitalize()} {rng.choice(FACTS)}."


def _bad(rng: random.Random, topic: str) -> str:
    kind = rng.randrange(3)
    if kind == 0:  # polite, but about another topic
        other = rng.choice([t for t in TOPICS if t != topic])
        return _good(rng, other)
    if kind == 1:  # on topic, but rude
        return f"{rng.choice(RUDE)} {topic.capitalize()} {rng.choice(FACTS)}."
    return rng.choice(EVASIVE)


def make_preference_pairs(n: int, seed: int) -> list[dict]:
    """``n`` pairs ``{prompt, chosen, rejected}``; the same seed gives the same pairs."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        prompt = rng.choice(PROMPTS).format(t=topic)
        pairs.append({"prompt": prompt, "chosen": _good(rng, topic), "rejected": _bad(rng, topic)})
    return pairs


def make_rankings(n: int, seed: int, k: int = 3) -> list[dict]:
    """``n`` listwise records ``{prompt, responses: [best, ..., worst]}`` (good, then off-topic, then rude/evasive)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        other = rng.choice([t for t in TOPICS if t != topic])
        ranked = [_good(rng, topic), _good(rng, other), rng.choice(RUDE) + " " + rng.choice(EVASIVE)][:k]
        records.append({"prompt": rng.choice(PROMPTS).format(t=topic), "responses": ranked})
    return records


def corpus(pairs: list[dict]) -> list[str]:
    """Every text in the pairs, for training a tokenizer."""
    texts: list[str] = []
    for p in pairs:
        texts += [p["prompt"], *(p.get("responses") or (p["chosen"], p["rejected"]))]
    return texts
