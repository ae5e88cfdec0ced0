"""A gate on the scoring engine's fault hook, shared by the scoring-core and sleep/wake tests: it holds the forward
thread inside one forward (of a chosen width) until the test releases it, so tests await events, not sleeps."""

from __future__ import annotations

import threading

GATE_WIDTH = 61  # a forward whose longest row has this many tokens waits at the gate


class Gate:
    """Engine fault hook: a forward of ``width`` tokens signals ``entered`` and waits until ``release``."""

    def __init__(self, width: int = GATE_WIDTH):
        self.width = width
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, rows: int, width: int) -> None:
        if width == self.width:
            self.entered.set()
            self.release.wait(60)
