"""Sleep and wake for every Scorer replica of a model: Serve's handle reaches one replica per call, so the desired
state is posted on a board that every replica watches.

The board lives in the application's ``MetricsHub`` (one replica; ``MetricsHub.watch_sleep`` and ``set_sleep_level``
call it). It keeps, per Scorer deployment, the desired sleep level and a version that grows with every request, and,
per replica, the latest version it applied and the level it is at. A Scorer replica runs ``follow_sleep_board`` for
its lifetime: a long poll (``watch``) that reports its state and returns when a newer desired state is posted (or after
``poll_wait_s``, as a heartbeat); the replica applies it (``ScoringCore.sleep`` or ``wake_up``: its admitted requests
finish first) and reports back on its next poll. ``set_level`` (the Gateway's ``RayLink.sleep`` / ``wake_up``) posts
a state and waits until every live replica of the deployment has acknowledged it, at most ``timeout_s``; it answers
how many did and at which level. A replica that starts later (autoscaling, a restart) reads the posted state on its
first poll, so it sleeps too; one that stopped polling for ``stale_after_s`` is taken as gone and not waited for.
``levels`` gives the live replicas' levels (``GET /is_sleeping``: true only when all of them sleep).

The hub keeps the board in memory: a restarted hub knows no desired state and learns the replicas' levels from their
next poll (they stay as they are). Plain asyncio, testable without Ray: ``board = SleepBoard(); await
board.set_level("Scorer", 1, timeout_s=5)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from rmserve.serve.rayserve.metrics_hub import HubLink

log = logging.getLogger("rmserve.serve")

POLL_WAIT_S = 10.0  # a replica re-polls at least this often (its heartbeat)
STALE_AFTER_S = 3 * POLL_WAIT_S
RETRY_S = 1.0


@dataclass
class _Replica:
    deployment: str
    applied: int  # the latest desired version it applied
    level: int  # its sleep level now (0 awake)
    error: Any  # why applying that version failed, if it did: a 4xx's error body (a dict), or a description
    seen: float  # monotonic time of its latest poll


@dataclass(frozen=True)
class Posted:
    """A desired state: ``level`` (0 awake), numbered by ``version``."""

    version: int
    level: int


class SleepBoard:
    """The desired sleep level of each Scorer deployment and what its replicas acknowledged."""

    def __init__(self, poll_wait_s: float = POLL_WAIT_S, stale_after_s: float = STALE_AFTER_S):
        self._poll_wait_s = poll_wait_s
        self._stale_after_s = stale_after_s
        # Wall-clock nanoseconds: a restarted hub numbers above any version a replica applied from the old one.
        self._version = time.time_ns()
        self._desired: dict[str, Posted] = {}
        self._replicas: dict[str, _Replica] = {}
        self._changed = asyncio.Condition()

    async def watch(self, member: str, deployment: str, applied: int, level: int, error: Any) -> Posted | None:
        """A replica reports its state, then waits for a desired state newer than ``applied``; returns the desired
        state (None when none was posted yet)."""
        async with self._changed:
            self._replicas[member] = _Replica(deployment, applied, level, error, time.monotonic())
            self._changed.notify_all()

            def news() -> bool:
                posted = self._desired.get(deployment)
                return posted is not None and posted.version > applied

            with contextlib.suppress(asyncio.TimeoutError):  # nothing new for a while: answer anyway, as a heartbeat
                await asyncio.wait_for(self._changed.wait_for(news), self._poll_wait_s)
            return self._desired.get(deployment)

    async def set_level(self, deployment: str, level: int, timeout_s: float) -> dict[str, Any]:
        """Post ``level`` for ``deployment`` and wait until each of its live replicas applied it (or ``timeout_s``).

        Answers ``{"replicas", "acknowledged", "levels", "errors"}`` over the live replicas; at least one replica must
        acknowledge (one that has not polled yet would otherwise make a sleep that nobody applied look done)."""
        async with self._changed:
            self._version += 1
            posted = Posted(self._version, level)
            self._desired[deployment] = posted
            self._changed.notify_all()

            def acknowledged() -> bool:
                live = self._live(deployment)
                return bool(live) and all(r.applied >= posted.version for r in live)

            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(acknowledged), timeout_s)
            live = self._live(deployment)
            return {
                "replicas": len(live),
                "acknowledged": sum(r.applied >= posted.version for r in live),
                "levels": sorted(r.level for r in live),
                "errors": [r.error for r in live if r.applied >= posted.version and r.error],
            }

    def levels(self, deployment: str) -> list[int]:
        """The sleep level of each live replica of ``deployment``."""
        return sorted(r.level for r in self._live(deployment))

    def _live(self, deployment: str) -> list[_Replica]:
        now = time.monotonic()
        return [
            r for r in self._replicas.values() if r.deployment == deployment and now - r.seen <= self._stale_after_s
        ]


class SleepTarget(Protocol):
    """What ``follow_sleep_board`` drives: a ``ScoringCore`` (``sleep``, ``wake_up``, ``sleep_level``)."""

    sleep_level: int

    async def sleep(self, level: int) -> int: ...

    async def wake_up(self) -> None: ...


async def follow_sleep_board(hub: Any, build: str, member: str, deployment: str, core: SleepTarget) -> None:
    """A Scorer replica's loop (a task for its lifetime): watch the board, apply each new desired state, report."""
    applied, error, warned = 0, None, False
    while True:
        try:
            posted = await hub.watch_sleep.remote(member, deployment, applied, core.sleep_level, error, build)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the hub is restarting, or not deployed yet
            if not warned:
                log.warning("sleep board: cannot reach the metrics hub (%r); retrying", exc)
                warned = True
            await asyncio.sleep(RETRY_S)
            continue
        warned = False
        if not isinstance(posted, Posted):  # None: nothing posted yet; else the hub belongs to another build
            if posted is not None:
                await asyncio.sleep(RETRY_S)
            continue
        if posted.version <= applied:
            continue
        try:
            if posted.level:
                await core.sleep(posted.level)
            else:
                await core.wake_up()
            error = None
        except Exception as exc:  # reported on the next poll; the Gateway's answer names it
            if isinstance(getattr(exc, "status", None), int) and exc.status < 500:  # type: ignore[attr-defined]
                # The caller's mistake (e.g. level 1 of a quantized model): its API error body, as plain data (the
                # hub never imports the model's modules).
                error = exc.to_dict()["error"]  # type: ignore[attr-defined]
            else:
                log.error("sleep board: applying level %d failed: %r", posted.level, exc, exc_info=exc)
                error = f"{type(exc).__name__}: {exc}"
        applied = posted.version


def start_following(link: HubLink, core: SleepTarget) -> asyncio.Task:
    """Start ``follow_sleep_board`` for the Serve replica this runs in (on its event loop, e.g. in ``__init__``)."""
    from ray import serve

    context = serve.get_replica_context()
    member = f"{context.deployment}#{context.replica_tag}"
    task = follow_sleep_board(link.hub, link.build, member, context.deployment, core)
    return asyncio.get_running_loop().create_task(task)
