"""Fault injection for tests: off unless ``testing.fault_injection`` is set in the server config.

Faults are keyed on an item's exact token length, so a test picks its victim with an ``input_ids``
item of that length and every other item is untouched.

Example::

    handle.set_faults.remote(fail_on_length=77).result()        # forwards whose longest row is 77 tokens raise
    handle.set_faults.remote(delays={55: 3.0}).result()         # requests holding a 55-token item wait 3 s
    handle.set_faults.remote(oom_on_length=40).result()         # forwards of 2+ rows of 40 tokens run out of memory
    handle.set_faults.remote(forward_delays={60: 2.0}).result()  # forwards whose longest row is 60 tokens take 2 s more
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch  # the Scorer, the only user of this module, has torch loaded anyway


class InjectedFault(RuntimeError):
    """What an injected forward failure raises (an 'unknown' exception to the server)."""


class InjectedOutOfMemory(torch.OutOfMemoryError):
    """An injected out-of-memory error (what CUDA raises): the engine splits the micro-batch in half and retries."""


@dataclass(frozen=True)
class FaultPlan:
    fail_on_length: int | None = None  # a micro-batch whose longest row has this many tokens raises
    delays: Mapping[int, float] = field(default_factory=dict)  # item length -> seconds its request waits first
    oom_on_length: int | None = None  # a micro-batch of 2+ rows whose longest row has this many tokens runs OOM
    forward_delays: Mapping[int, float] = field(default_factory=dict)  # longest row -> seconds the forward stalls

    def engine_hook(self) -> Callable[[int, int], None] | None:
        """The ``ScoringEngine.fault_injector`` for this plan (called with rows, longest row)."""
        if self.fail_on_length is None and self.oom_on_length is None and not self.forward_delays:
            return None
        fail_width, oom_width, stalls = self.fail_on_length, self.oom_on_length, dict(self.forward_delays)

        def fail(rows: int, width: int) -> None:
            if width in stalls:  # runs on the forward thread: the replica's next forward waits too
                time.sleep(stalls[width])
            if width == fail_width:
                raise InjectedFault(f"injected failure at /internal/detail for a {rows}x{width} micro-batch")
            if width == oom_width and rows > 1:
                raise InjectedOutOfMemory(f"CUDA out of memory (injected) for a {rows}x{width} micro-batch")

        return fail

    def request_delay(self, lengths: Sequence[int]) -> float:
        """Seconds a request with items of these lengths waits before its items join a batch."""
        return max((self.delays.get(n, 0.0) for n in lengths), default=0.0)
