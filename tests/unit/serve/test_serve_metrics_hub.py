"""The metrics hub's gather protocol with plain asyncio (the same class is a Serve deployment in the server)."""

from __future__ import annotations

import asyncio
import contextlib
import time

from rmserve.serve.metrics.store import MetricsRecorder
from rmserve.serve.rayserve.metrics_hub import OTHER_BUILD, MetricsHub, totals

BUILD = "build-1"


class Replica:
    """A replica's reporting loop against a hub in the same event loop (what report_metrics does over Ray)."""

    def __init__(self, hub: MetricsHub, name: str, kind: str = "scorer", build: str = BUILD):
        self.hub, self.name, self.kind, self.build = hub, name, kind, build
        self.recorder = MetricsRecorder()
        self.recorder.set(f"{kind}_replicas", 1)
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        generation = 0
        while True:
            generation = await self.hub.poll(self.name, self.kind, generation, self.recorder.snapshot(), self.build)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_scrape_sees_everything_recorded_before_it_on_every_replica():
    hub = MetricsHub(BUILD)
    replicas = [Replica(hub, "scorer#a"), Replica(hub, "scorer#b"), Replica(hub, "gateway#a", "gateway")]
    await settle()
    # Recorded after the replicas' last poll: only a fresh snapshot, taken once the scrape started, has it.
    replicas[0].recorder.inc("items_scored", 3)
    replicas[1].recorder.inc("items_scored", 4)
    replicas[2].recorder.inc("requests", route="/v1/score", status="200")
    result = await hub.collect(wait_s=5.0)
    assert all(fresh for _, _, fresh in result["members"].values())
    total = totals(result)
    assert total.get("items_scored") == 7.0
    assert total.get("requests", route="/v1/score", status="200") == 1.0
    assert (total.get("scorer_replicas"), total.get("gateway_replicas")) == (2.0, 1.0)
    replicas[1].recorder.inc("items_scored", 10)
    assert totals(await hub.collect(wait_s=5.0)).get("items_scored") == 17.0
    for r in replicas:
        await r.stop()


async def test_a_silent_replica_delays_one_scrape_only_and_counts_with_its_last_numbers():
    hub = MetricsHub(BUILD)
    alive, dead = Replica(hub, "scorer#alive"), Replica(hub, "scorer#dead")
    dead.recorder.inc("items_scored", 5)
    await settle()
    await hub.collect(wait_s=5.0)  # both answer: the dead one's 5 items are in its last snapshot
    await dead.stop()
    alive.recorder.inc("items_scored", 1)
    started = time.monotonic()
    result = await hub.collect(wait_s=0.3)
    assert 0.25 <= time.monotonic() - started < 2.0
    assert result["members"]["scorer#dead"][2] is False and result["members"]["scorer#alive"][2] is True
    assert totals(result).get("items_scored") == 6.0
    started = time.monotonic()
    result = await hub.collect(wait_s=0.3)  # the late replica is not waited for again
    assert time.monotonic() - started < 0.2
    assert totals(result).get("items_scored") == 6.0
    await alive.stop()


async def test_a_departed_replica_keeps_its_counters_but_not_its_gauges():
    hub = MetricsHub(BUILD, poll_wait_s=0.05, stale_after_s=0.2)
    alive, gone = Replica(hub, "scorer#alive"), Replica(hub, "scorer#gone")
    gone.recorder.inc("items_scored", 5)
    gone.recorder.observe("batch_size_items", 5)
    gone.recorder.set("queue_depth", 3)
    await settle()
    await hub.collect(wait_s=5.0)
    await gone.stop()
    await asyncio.sleep(0.3)
    result = await hub.collect(wait_s=0.1)
    assert set(result["members"]) == {"scorer#alive"}
    total = totals(result)
    assert total.get("items_scored") == 5.0 and total.histogram("batch_size_items").count == 1
    assert total.get("queue_depth") == 0.0 and total.get("scorer_replicas") == 1.0
    # It comes back (e.g. after a long pause): its cumulative snapshot replaces the departed copy.
    back = Replica(hub, "scorer#gone")
    back.recorder.inc("items_scored", 7)
    await settle()
    assert totals(await hub.collect(wait_s=5.0)).get("items_scored") == 7.0
    await alive.stop()
    await back.stop()


async def test_idle_replicas_keep_polling_as_a_heartbeat():
    hub = MetricsHub(BUILD, poll_wait_s=0.05, stale_after_s=0.3)
    replica = Replica(hub, "scorer#idle")
    replica.recorder.inc("items_scored", 2)
    await asyncio.sleep(0.6)  # far past stale_after_s without a scrape
    result = await hub.collect(wait_s=5.0)
    assert set(result["members"]) == {"scorer#idle"} and result["members"]["scorer#idle"][2]
    assert totals(result).get("scorer_replicas") == 1.0
    await replica.stop()


async def test_a_new_hub_starts_above_the_old_generations():
    """A replica that answered scrapes of a lost hub must not look up to date to its replacement."""
    old = MetricsHub(BUILD)
    rec = MetricsRecorder()
    poll = asyncio.get_running_loop().create_task(old.poll("scorer#a", "scorer", 0, rec.snapshot(), BUILD))
    await settle()
    await old.collect(wait_s=0.01)
    seen = await asyncio.wait_for(poll, 5.0)  # the generation the replica carries into its next poll
    new = MetricsHub(BUILD)
    rec.inc("items_scored", 1)
    started = time.monotonic()
    generation = await new.poll("scorer#a", "scorer", seen, rec.snapshot(), BUILD)
    assert generation > seen and time.monotonic() - started < 0.5  # not waiting for a generation the new hub is past
    assert totals(await new.collect(wait_s=0.01)).get("items_scored") == 1.0


async def test_a_replica_of_another_build_is_not_counted():
    """During a redeploy a replica of the previous build may still poll the new build's hub: its counters must not
    enter the new totals, and it is told so at once (it retries, in case it reached a hub of the other build)."""
    hub = MetricsHub(BUILD)
    ours = Replica(hub, "scorer#new")
    ours.recorder.inc("items_scored", 2)
    rec = MetricsRecorder()
    rec.inc("items_scored", 1000)
    assert await asyncio.wait_for(hub.poll("scorer#old", "scorer", 0, rec.snapshot(), "build-0"), 5.0) == OTHER_BUILD
    await settle()
    result = await hub.collect(wait_s=5.0)
    assert set(result["members"]) == {"scorer#new"} and totals(result).get("items_scored") == 2.0
    await ours.stop()


def test_only_the_hubs_queue_length_warnings_are_dropped():
    import logging

    from rmserve.serve.rayserve.metrics_hub import HubProbeWarnings

    def record(deployment: str) -> logging.LogRecord:
        text = f"Failed to get queue length from Replica(id='x', deployment='{deployment}', app='rmserve') within 0.1s."
        return logging.LogRecord("ray.serve", logging.WARNING, __file__, 1, text, None, None)

    hub_filter = HubProbeWarnings()
    assert not hub_filter.filter(record("MetricsHub"))
    assert hub_filter.filter(record("Scorer"))
    assert hub_filter.filter(logging.LogRecord("ray.serve", logging.WARNING, __file__, 1, "other", None, None))
