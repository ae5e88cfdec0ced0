"""The Scorer's one batching queue: items from every request wait here, and the forward thread takes them a batch
at a time, priced with the cost the engine will really compute. Thread-safe, no asyncio, no Ray, no torch.

``take`` (the forward thread) blocks until an item waits. When the engine was idle (nothing waited when it asked),
it then waits up to ``wait_timeout_s`` for more items, unless the queue already holds a full batch; when items
piled up during the previous forward, it takes them at once. A batch is the longest first-come-first-served run of
waiting items whose ``price`` (``ScoringEngine.batch_cost``: padded tokens of the micro-batches the engine will
run, plus their overhead, later prefix- and cache-aware) fits the budget, with at most ``max_batch_items`` items;
the first item always goes, however long. ``withdraw`` takes a request's waiting items out (its caller went away);
the same lock orders it against ``take``, so an item is either withdrawn or in a batch, never both.

Example::

    queue = BatchQueue(engine.batch_cost, lambda: engine.max_batch_tokens, max_batch_items=256, wait_timeout_s=0.005)
    ticket = Ticket(count=2)
    queue.put(ticket, [[1, 5, 9], [1, 7]])
    batch = queue.take()            # on the forward thread: [QueuedItem([1, 5, 9], ticket, 0), QueuedItem(...)]
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


class BatchQueue:
    """First come, first served; batches priced by ``price`` within ``budget()`` and ``max_batch_items``."""

    def __init__(
        self,
        price: Callable[[list[Sequence[int]]], int],
        budget: Callable[[], int],
        *,
        max_batch_items: int = 256,
        wait_timeout_s: float = 0.005,
    ):
        self.price = price
        self.budget = budget
        self.max_batch_items = max_batch_items
        self.wait_timeout_s = wait_timeout_s
        self._items: deque[QueuedItem] = deque()
        self._tokens = 0  # tokens of the waiting items: a lower bound of their price, for the early close
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

    def take(self) -> list[QueuedItem] | None:
        """The next batch (blocks until there is one); None once the queue is closed."""
        with self._cond:
            idle = not self._items  # the engine asked with nothing waiting: it may wait a moment for company
            while True:
                while not self._items and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                if idle and self.wait_timeout_s > 0:
                    deadline = time.monotonic() + self.wait_timeout_s
                    while self._items and not self._full() and not self._closed:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                if self._items:  # (all of them may have been withdrawn meanwhile)
                    return self._pop(self._batch_size())

    def close(self) -> None:
        """Wake the forward thread for good: ``take`` returns None from now on."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- internals (called with the lock held) ------------------------------------------------------
    def _full(self) -> bool:
        return len(self._items) >= self.max_batch_items or self._tokens >= self.budget()

    def _batch_size(self) -> int:
        """The most leading items whose price fits the budget (at least one): one ``price`` call when all the
        candidates fit, a binary search otherwise (a batch's price never falls when an item joins it)."""
        candidates = [q.input_ids for q in itertools.islice(self._items, self.max_batch_items)]
        budget = self.budget()
        if self.price(candidates) <= budget:
            return len(candidates)
        fits, over = 1, len(candidates)
        while over - fits > 1:
            mid = (fits + over) // 2
            if self.price(candidates[:mid]) <= budget:
                fits = mid
            else:
                over = mid
        return fits

    def _pop(self, count: int) -> list[QueuedItem]:
        batch = [self._items.popleft() for _ in range(count)]
        self._tokens -= sum(len(q.input_ids) for q in batch)
        return batch
