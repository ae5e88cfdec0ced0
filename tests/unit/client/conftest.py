"""Fixtures for the client unit tests (helpers live in ``client_fakes``)."""

from __future__ import annotations

import pytest
from client_fakes import FakeServer


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def fake() -> FakeServer:
    return FakeServer()


@pytest.fixture(autouse=True)
def _no_rmserve_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The developer's shell must not leak a key or URL into tests that check the defaults.
    monkeypatch.delenv("RMSERVE_API_KEY", raising=False)
    monkeypatch.delenv("RMSERVE_BASE_URL", raising=False)
