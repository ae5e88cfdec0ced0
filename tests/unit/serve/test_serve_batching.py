"""The Scorer's one batching queue without Ray: batches priced by the real engine's ``batch_cost``, first come first
served, the item cap, withdrawals, and the short wait only when the engine was idle."""

from __future__ import annotations

import threading

import pytest

from rmserve.serve.core.batching import BatchQueue, Ticket


@pytest.fixture
def engine(demo_model):
    return demo_model.engine


def queue_for(engine, budget: int, *, max_batch_items: int = 256, wait_timeout_s: float = 0.0) -> BatchQueue:
    return BatchQueue(engine.plan, lambda: budget, max_batch_items=max_batch_items, wait_timeout_s=wait_timeout_s)


def ids(length: int) -> list[int]:
    return [5 + k % 200 for k in range(length)]


def test_a_batch_is_the_longest_leading_run_the_engine_prices_within_the_budget(engine):
    lengths = [30, 200, 40, 35, 300, 20, 25, 500, 60]
    budget = engine.batch_cost([ids(n) for n in lengths[:4]])  # exactly what the first four cost
    queue = queue_for(engine, budget)
    ticket = Ticket(len(lengths))
    assert queue.put(ticket, [ids(n) for n in lengths])
    batch = queue.take().items
    assert [len(q.input_ids) for q in batch] == lengths[:4]
    assert [q.index for q in batch] == [0, 1, 2, 3] and all(q.ticket is ticket for q in batch)
    assert engine.batch_cost([q.input_ids for q in batch]) <= budget
    assert engine.batch_cost([ids(n) for n in lengths[:5]]) > budget  # the next item would not have fitted
    rest = queue.take().items
    assert [q.index for q in rest][0] == 4  # first come, first served


def test_an_item_over_the_budget_still_gets_a_batch_of_its_own(engine):
    queue = queue_for(engine, budget=100)
    queue.put(Ticket(2), [ids(400), ids(10)])
    assert [len(q.input_ids) for q in queue.take().items] == [400]
    assert [len(q.input_ids) for q in queue.take().items] == [10]


def test_the_item_cap_bounds_a_batch(engine):
    queue = queue_for(engine, budget=1_000_000, max_batch_items=3)
    queue.put(Ticket(7), [ids(5)] * 7)
    assert [len(queue.take().items) for _ in range(3)] == [3, 3, 1]


def test_withdraw_removes_only_that_requests_waiting_items(engine):
    queue = queue_for(engine, budget=1_000_000)
    victim, neighbour = Ticket(3), Ticket(2)
    queue.put(victim, [ids(7)] * 3)
    queue.put(neighbour, [ids(8)] * 2)
    assert queue.withdraw(victim) == 3
    assert queue.withdraw(victim) == 0  # counted once
    assert [q.ticket for q in queue.take().items] == [neighbour, neighbour]
    assert queue.put(victim, [ids(7)]) is False  # a gone request queues nothing more


def test_a_request_withdrawn_before_it_was_queued_drops_all_its_items(engine):
    queue = queue_for(engine, budget=1000)
    ticket = Ticket(4)
    assert queue.withdraw(ticket) == 4
    assert queue.put(ticket, [ids(3)] * 4) is False and len(queue) == 0


def test_items_that_waited_during_a_forward_go_without_the_wait(engine):
    # With an hour-long wait timeout, take() only returns at once because it does not wait: items were waiting.
    queue = queue_for(engine, budget=1_000_000, wait_timeout_s=3600)
    queue.put(Ticket(2), [ids(5), ids(6)])
    assert len(queue.take().items) == 2


def test_an_idle_engine_stops_waiting_once_a_full_batch_waits(engine):
    queue = queue_for(engine, budget=1_000_000, max_batch_items=2, wait_timeout_s=3600)
    taken: list = []
    taker = threading.Thread(target=lambda: taken.append(queue.take()))
    taker.start()  # idle: nothing waits yet
    queue.put(Ticket(1), [ids(5)])
    queue.put(Ticket(1), [ids(6)])  # the cap is reached: the batch goes without waiting out the hour
    taker.join(timeout=60)
    assert not taker.is_alive() and [len(q.input_ids) for q in taken[0].items] == [5, 6]


def test_close_ends_take(engine):
    queue = queue_for(engine, budget=1000)
    result: list = []
    taker = threading.Thread(target=lambda: result.append(queue.take()))
    taker.start()
    queue.close()
    taker.join(timeout=60)
    assert result == [None]


def take_in_thread(queue: BatchQueue, *puts: list) -> list:
    """``take`` on a thread that starts before the ``puts`` (an idle engine, as far as the thread got there first);
    returns the batch's item lengths, or fails when take is still waiting after a minute."""
    taken: list = []
    taker = threading.Thread(target=lambda: taken.append(queue.take()))
    taker.start()
    for sequences in puts:
        queue.put(Ticket(len(sequences)), sequences)
    taker.join(timeout=60)
    assert not taker.is_alive(), "take waited for company"
    return [len(q.input_ids) for q in taken[0].items]


def test_an_idle_engine_waits_for_company_only_after_a_batch_of_several_requests(engine):
    """A lone client's request goes at once (an hour-long wait is not waited); after a batch that held two requests'
    items, the next idle take waits until the batch is full."""
    queue = queue_for(engine, budget=1_000_000, max_batch_items=2, wait_timeout_s=3600)
    queue.put(Ticket(1), [ids(5)])
    assert len(queue.take().items) == 1  # items were waiting: no wait; one request in it: no company
    assert take_in_thread(queue, [ids(6)]) == [6]  # idle and alone last time: at once, not after an hour
    queue.put(Ticket(1), [ids(7)])
    queue.put(Ticket(1), [ids(8)])
    assert len(queue.take().items) == 2  # two requests in one batch: company
    assert take_in_thread(queue, [ids(9)], [ids(10)]) == [9, 10]  # idle after company: waits for the full batch
