"""Graceful shutdown of ``rmserve serve``: on SIGTERM the Gateways answer new requests 503 ``not_ready`` while the
requests they already accepted finish; only then does the driver tear the application down.

Serve's own teardown cannot do this: deleting an application removes its route from the HTTP proxy first (new
requests get a plain-text 404, which no client retries), and ``serve.shutdown`` drops the connections in flight.

The driver owns a ``ShutdownCoordinator``, a small named actor (``rmserve-shutdown:<app>`` in namespace
``rmserve``) created before the application is deployed. Every Gateway replica runs ``follow_shutdown`` on its event
loop: a long poll that returns when the driver calls ``start_draining``; the Gateway then refuses new requests
(``Drain.admit`` raises ``NotReadyError``), waits until its accepted requests have been answered, and reports itself
drained. The driver waits for every Gateway to report (or for its deadline). An application started any other way
(``serve run``, ``serve deploy``) has no coordinator, and its Gateways never drain: Serve's own shutdown applies.

The logic is plain asyncio, testable without Ray::

    drain = Drain()
    drain.admit()            # a request is accepted ...
    drain.release()          # ... and answered
    drain.draining = True    # from now on admit() raises NotReadyError
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from rmserve.serve.edge.drain import Drain

log = logging.getLogger("rmserve.serve")

NAMESPACE = "rmserve"


class ShutdownCoordinator:
    """The driver's side (a Ray actor in ``rmserve serve``): starts the drain, knows when every Gateway is done."""

    def __init__(self) -> None:
        self._draining = asyncio.Event()
        self._members: dict[str, bool] = {}  # Gateway replica -> drained

    async def wait_for_drain(self, member: str) -> None:
        """A Gateway's long poll: returns when the drain starts."""
        self._members.setdefault(member, False)
        await self._draining.wait()

    def start_draining(self) -> None:
        self._draining.set()

    def mark_drained(self, member: str) -> None:
        self._members[member] = True

    def drained(self) -> dict[str, bool]:
        return dict(self._members)


def coordinator_name(app_name: str) -> str:
    return f"rmserve-shutdown:{app_name}"


def start_coordinator(app_name: str) -> Any:
    """Create the application's coordinator (in the driver, before the application is deployed)."""
    import ray

    return (
        ray.remote(ShutdownCoordinator)
        .options(name=coordinator_name(app_name), namespace=NAMESPACE, num_cpus=0, max_concurrency=1024)
        .remote()
    )


def drain(coordinator: Any, timeout_s: float) -> dict[str, bool]:
    """Start draining and wait (at most ``timeout_s``) until every Gateway has answered what it accepted."""
    import ray

    ray.get(coordinator.start_draining.remote())
    deadline = time.monotonic() + timeout_s
    members = ray.get(coordinator.drained.remote())
    while not all(members.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
        members = ray.get(coordinator.drained.remote())
    return members


async def follow_shutdown(app_name: str, member: str, gateway_drain: Drain) -> None:
    """A Gateway replica's task: when the driver starts draining, refuse new requests, finish the accepted ones."""
    import ray

    try:
        coordinator = ray.get_actor(coordinator_name(app_name), namespace=NAMESPACE)
    except ValueError:  # not started by `rmserve serve`: nothing to follow
        return
    try:
        await coordinator.wait_for_drain.remote(member)
        gateway_drain.draining = True
        log.info("shutting down: refusing new requests, finishing %d in flight", gateway_drain.in_flight)
        await gateway_drain.wait_idle()
        await coordinator.mark_drained.remote(member)
    except ray.exceptions.RayActorError:  # the driver is gone: so is the application, soon
        return


def start_following(gateway_drain: Drain) -> asyncio.Task:
    """Run ``follow_shutdown`` for the Gateway replica this runs in (call on its event loop, e.g. in ``__init__``)."""
    from ray import serve

    context = serve.get_replica_context()
    member = f"{context.deployment}#{context.replica_tag}"
    return asyncio.get_running_loop().create_task(follow_shutdown(context.app_name, member, gateway_drain))
