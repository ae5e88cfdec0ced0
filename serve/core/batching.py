"""The Scorer's one batching queue: items from every request wait here, and the forward thread takes them a batch
at a time, planned and priced by the engine: the plan that priced a batch is the plan the engine runs. Thread-safe,
no asyncio, no Ray, no torch.

``take`` (the forward thread) blocks until an item waits. When the engine was idle (nothing waited when it asked)
and its last batch held items of more than one request (others are about), it then waits up to ``wait_timeout_s``
for more items, unless the queue already holds a full batch; a lone client's request goes at once (it would wait
for nobody), and items that piled up during the previous forward are taken at once. (A GRPO group's first sample
that goes alone loses nothing: the engine copies its prompt out of that forward for the next sample.) A batch is the
longest first-come-first-served run of waiting items whose plan (``ScoringEngine.plan``: duplicates and reward-cache
hits answered, shared prefixes computed once, micro-batches) costs no more than the budget (``BatchPlan.cost``: the
padded tokens of its forwards plus their overhead), with at most ``max_batch_items`` items; the first item always
goes, however long. ``take`` hands the batch over with that plan, for ``ScoringEngine.run``. ``withdraw`` takes a
request's waiting items out (its caller went away); the same lock orders it against ``take``, so an item is either
withdrawn or in a batch, never both.

Example::

    queue = BatchQueue(engine.plan, lambda: engine.max_batch_tokens, max_batch_items=256, wait_timeout_s=0.005)
    ticket = Ticket(count=2)
    queue.put(ticket, [[1, 5, 9], [1, 7]])
    batch = queue.take()            # on the forward thread: Batch([QueuedItem([1, 5, 9], ticket, 0), ...], plan)
    engine.run(batch.plan)          # rewards of batch.items, in order
    queue.withdraw(other_ticket)    # -> how many of its items were still waiting (they never reach a forward)
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Ticket:
    """One request's items on their way to forward passes: their outcomes, and whether the caller went away.

    ``context`` is the caller's (e.g. the asyncio future and loop its outcomes are delivered to).
    """

    count: int
    context: Any = None
    outcomes: list[Any] = field(default_factory=list)
    remaining: int = 0
    enqueued: bool = False
    gone: bool = False

    def __post_init__(self) -> None:
        self.outcomes = [None] * self.count
        self.remaining = self.count


@dataclass(eq=False)
class QueuedItem:
    """One waiting item: its token ids, its request's ticket and its index in that request."""

    input_ids: Sequence[int]
    ticket: Ticket
    index: int


@dataclass(eq=False)
class Batch:
    """Items taken together, and the plan (an object with a ``cost``) that priced them."""

    items: list[QueuedItem]
    plan: Any


class BatchQueue:
    """First come, first served; batches planned by ``plan`` within ``budget()`` and ``max_batch_items``."""

    def __init__(
        self,
        plan: Callable[[list[Sequence[int]]], Any],
        budget: Callable[[], int],
        *,
        max_batch_items: int = 256,
        wait_timeout_s: float = 0.005,
    ):
        self.plan = plan
        self.budget = budget
        self.max_batch_items = max_batch_items
        self.wait_timeout_s = wait_timeout_s
        self._items: deque[QueuedItem] = deque()
        # Tokens of the waiting items: the early close takes a budget's worth of them as a full batch (a cheap guess;
        # the plan may cost less, as shared prefixes and cached rewards are not computed).
        self._tokens = 0
        self._company = True  # the last batch held several requests' items (at start: assume so)
        self._closed = False
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, ticket: Ticket, sequences: Sequence[Sequence[int]]) -> bool:
        """Queue a request's items; False (nothing queued) when its caller already went away."""
        with self._cond:
            if ticket.gone or self._closed:
                return False
            ticket.enqueued = True
            self._items.extend(QueuedItem(ids, ticket, k) for k, ids in enumerate(sequences))
            self._tokens += sum(len(ids) for ids in sequences)
            self._cond.notify()
        return True

    def withdraw(self, ticket: Ticket) -> int:
        """Mark the request gone and remove its waiting items; returns how many items will never reach a forward
        (all of them when they were not queued yet)."""
        with self._cond:
            if ticket.gone:
                return 0
            ticket.gone = True
            if not ticket.enqueued:
                return ticket.count
            kept = deque(q for q in self._items if q.ticket is not ticket)
            removed = len(self._items) - len(kept)
            if removed:
                self._tokens -= sum(len(q.input_ids) for q in self._items if q.ticket is ticket)
                self._items = kept
            return removed

    def take(self) -> Batch | None:
        """The next batch and its plan (blocks until there is one); None once the queue is closed."""
        with self._cond:
            idle = not self._items  # the engine asked with nothing waiting: it may wait a moment for company
            while True:
                while not self._items and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                if idle and self._company and self.wait_timeout_s > 0:
                    deadline = time.monotonic() + self.wait_timeout_s
                    while self._items and not self._full() and not self._closed:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                if self._items:  # (all of them may have been withdrawn meanwhile)
                    count, plan = self._planned_batch()
                    items = self._pop(count)
                    self._company = any(q.ticket is not items[0].ticket for q in items)
                    return Batch(items, plan)

    def close(self) -> None:
        """Wake the forward thread for good: ``take`` returns None from now on."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- internals (called with the lock held) ------------------------------------------------------
    def _full(self) -> bool:
        return len(self._items) >= self.max_batch_items or self._tokens >= self.budget()

    def _planned_batch(self) -> tuple[int, Any]:
        """The most leading items whose plan fits the budget (at least one), and that plan: one plan when all the
        candidates fit, a binary search otherwise (a batch's cost never falls when an item joins it)."""
        candidates = [q.input_ids for q in itertools.islice(self._items, self.max_batch_items)]
        budget = self.budget()
        plan = self.plan(candidates)
        if plan.cost <= budget:
            return len(candidates), plan
        fits, fits_plan, over = 1, None, len(candidates)
        while over - fits > 1:
            mid = (fits + over) // 2
            attempt = self.plan(candidates[:mid])
            if attempt.cost <= budget:
                fits, fits_plan = mid, attempt
            else:
                over = mid
        return fits, fits_plan if fits_plan is not None else self.plan(candidates[:1])

    def _pop(self, count: int) -> list[QueuedItem]:
        batch = [self._items.popleft() for _ in range(count)]
        self._tokens -= sum(len(q.input_ids) for q in batch)
        return batch
