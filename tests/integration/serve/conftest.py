"""Fixtures shared by the Ray Serve integration modules (helpers live in serve_harness.py)."""

from __future__ import annotations

import pytest
from serve_harness import LiveApp


@pytest.fixture(scope="module")
def offline(app: LiveApp):
    """The same model loaded in the test process: the reference for every reward the server returns."""
    from rmserve.model import load_reward_model

    return load_reward_model(app.config.model_spec())
