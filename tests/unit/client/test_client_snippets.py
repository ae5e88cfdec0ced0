"""The README snippets and the package docstring run as written, against the in-memory fake server.

``snippet_blocks`` is also what an integration test can use to run the same snippets against a real server.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import httpx
import pytest
from client_fakes import URL, FakeServer

import rmserve.client

SNIPPETS = Path(rmserve.client.__file__).with_name("README_SNIPPETS.md")


def snippet_blocks(markdown: str) -> dict[str, str]:
    """``{section title: code}`` for each fenced python block, titled by the ``##`` heading above it."""
    blocks, title = {}, "preamble"
    for heading, code in re.findall(r"^## ([^\n]+)$|^```python\n(.*?)^```", markdown, flags=re.S | re.M):
        if heading:
            title = heading.strip()
        else:
            blocks[title] = code
    return blocks


def docstring_usage(doc: str) -> str:
    """The indented block after ``Usage::`` in a docstring, dedented."""
    match = re.search(r"Usage::\n\n((?:    .*\n|\n)+)", doc)
    assert match, "no Usage:: block"
    return textwrap.dedent(match.group(1))


@pytest.fixture
def patched_clients(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    """Make the clients the snippets import talk to the fake server instead of the network."""
    fake = FakeServer()

    class RewardClient(rmserve.client.RewardClient):
        def __init__(self, base_url=None, **kwargs):
            kwargs.setdefault("http_client", httpx.Client(transport=httpx.MockTransport(fake.handle)))
            super().__init__(base_url, **kwargs)

    class AsyncRewardClient(rmserve.client.AsyncRewardClient):
        def __init__(self, base_url=None, **kwargs):
            kwargs.setdefault("http_client", httpx.AsyncClient(transport=httpx.MockTransport(fake.handle_async)))
            super().__init__(base_url, **kwargs)

    monkeypatch.setattr(rmserve.client, "RewardClient", RewardClient)
    monkeypatch.setattr(rmserve.client, "AsyncRewardClient", AsyncRewardClient)
    return fake


def test_snippets_file_has_the_expected_sections():
    assert list(snippet_blocks(SNIPPETS.read_text())) == [
        "PPO loop (blocking client)",
        "GRPO with asyncio (async client)",
        "Errors",
    ]


def test_ppo_snippet_runs(patched_clients):
    namespace = {"RMSERVE_URL": URL}
    exec(snippet_blocks(SNIPPETS.read_text())["PPO loop (blocking client)"], namespace)
    assert [r.url.path for r in patched_clients.requests] == ["/v1/score"] * 4
    assert all(str(r.url).startswith(URL) for r in patched_clients.requests)
    assert namespace["rewards"] == [1.0, 11.0, 9.0] * 4  # the fake's reward is the response's length
    assert namespace["chat_reward"] == 1.0


def test_grpo_snippet_runs(patched_clients):
    namespace = {"RMSERVE_URL": URL}
    exec(snippet_blocks(SNIPPETS.read_text())["GRPO with asyncio (async client)"], namespace)
    paths = sorted(r.url.path for r in patched_clients.requests)
    assert paths == ["/v1/rerank", "/v1/score", "/v1/score"]
    assert namespace["best_completions"] == ["Salt wind, gull and tide", "A function calling itself."]
    assert all(abs(sum(a)) < 1e-6 for a in namespace["advantages"])  # group-relative: each group sums to zero


def test_errors_snippet_runs(patched_clients, capsys):
    exec(snippet_blocks(SNIPPETS.read_text())["Errors"], {"RMSERVE_URL": URL})
    assert [r.url.path for r in patched_clients.requests] == ["/v1/score"]


def test_package_docstring_usage_runs(patched_clients):
    code = docstring_usage(rmserve.client.__doc__)
    assert "RewardClient(RMSERVE_URL)" in code
    namespace = {"RMSERVE_URL": URL}
    exec(code, namespace)
    assert namespace["rewards"] == [1.0, 1.0]
    assert (namespace["pair"].preferred, namespace["pair"].prob_a) == ("a", 0.5)  # "4" and "5" tie; ties prefer a
    assert namespace["best"] == 0  # "9" scores 1.0 like "7" and "4"; a tie keeps input order


@pytest.mark.parametrize("module", ["rmserve.client._retry", "rmserve.client._calls"])
def test_docstring_examples(module):
    import doctest
    import importlib

    results = doctest.testmod(importlib.import_module(module))
    assert results.attempted > 0 and results.failed == 0
