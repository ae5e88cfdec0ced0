"""Graceful shutdown without Ray: a Gateway's ``Drain`` and the driver's ``ShutdownCoordinator``."""

from __future__ import annotations

import asyncio

import pytest

from rmserve.model.errors import NotReadyError
from rmserve.serve.edge.drain import Drain
from rmserve.serve.rayserve.lifecycle import ShutdownCoordinator


async def test_drain_counts_requests_and_refuses_new_ones_once_draining():
    drain = Drain()
    drain.admit()
    drain.admit()
    assert drain.in_flight == 2
    drain.draining = True
    with pytest.raises(NotReadyError) as info:
        drain.admit()
    assert info.value.status == 503 and "shutting down" in info.value.message
    assert drain.in_flight == 2  # a refused request is not counted
    idle = asyncio.ensure_future(drain.wait_idle())
    drain.release()
    await asyncio.sleep(0)
    assert not idle.done()  # one request is still in flight
    drain.release()
    await asyncio.wait_for(idle, 1.0)
    assert drain.in_flight == 0


async def test_idle_drain_is_immediately_idle():
    await asyncio.wait_for(Drain().wait_idle(), 1.0)


async def test_coordinator_wakes_every_gateway_and_knows_when_all_are_drained():
    coordinator = ShutdownCoordinator()
    gateways = {name: Drain() for name in ("g1", "g2")}
    gateways["g2"].admit()  # g2 has a request in flight

    async def follow(name: str) -> None:
        await coordinator.wait_for_drain(name)
        gateways[name].draining = True
        await gateways[name].wait_idle()
        coordinator.mark_drained(name)

    followers = [asyncio.ensure_future(follow(name)) for name in gateways]
    await asyncio.sleep(0)
    assert coordinator.drained() == {"g1": False, "g2": False}  # registered, not draining yet
    assert not any(gateway.draining for gateway in gateways.values())
    coordinator.start_draining()
    await asyncio.sleep(0.01)
    assert all(gateway.draining for gateway in gateways.values())
    assert coordinator.drained() == {"g1": True, "g2": False}
    gateways["g2"].release()
    await asyncio.wait_for(asyncio.gather(*followers), 1.0)
    assert coordinator.drained() == {"g1": True, "g2": True}
