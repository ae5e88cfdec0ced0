"""``MetricsHub``: one small deployment of each application that gathers every replica's metrics for ``GET /metrics``.

A ``DeploymentHandle`` call reaches *one* replica, chosen by Serve's router, so ``/metrics`` cannot ask
the Scorers through the handle. Instead every replica (Scorer and Gateway) runs ``report_metrics``, a
long poll against the hub: it hands the hub its ``Snapshot`` and waits until a scrape starts; the
scrape (``MetricsHub.collect``) wakes all of them, and each answers with a snapshot taken *after* the
scrape began, so work finished before the scrape is always in it. ``collect`` waits at most
``wait_s`` for the answers; a replica that does not answer in time (dead, or its event loop stuck)
counts with its last snapshot and is not waited for again until it polls again. A replica that has
not polled for ``stale_after_s`` is taken as gone: its counters and histograms stay in the totals,
its gauges leave them. A restarted replica has a new identity and starts from zero.

The hub is a deployment of the application itself (``MetricsHub``: one replica, zero CPUs), bound by
``build_app`` next to the Scorers and the Gateway, which reach it through the ``HubLink`` they are
bound with. So its lifetime is the application's: ``serve delete`` removes it with its numbers, and a
redeploy that rebuilds the application (``serve.run``, or a config whose ``args`` or code changed)
replaces it, so the totals start from zero. Each ``build_app`` call names its build, and the hub counts
only replicas of its own build: a replica of the previous build, still draining during a redeploy,
cannot carry its old counters into the new totals. Serve restarts a hub replica that dies, with the
same build: live replicas report their cumulative numbers to it again, and only the counters of
replicas that had already gone are lost (a counter reset, which Prometheus' ``rate()`` handles).

The same long-poll pattern carries sleep and wake to every Scorer replica: the hub holds a ``SleepBoard``
(``sleep_board.py``) with the desired sleep level of each Scorer deployment, which each replica watches and
acknowledges.

Its logic is plain asyncio, testable without Ray: ``hub = MetricsHub("b1"); await hub.collect(0.1)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rmserve.serve.metrics.store import CONTENT_TYPE, MetricsRecorder, Snapshot, merge, render
from rmserve.serve.rayserve.sleep_board import Posted, SleepBoard

log = logging.getLogger("rmserve.serve")

HUB_DEPLOYMENT = "MetricsHub"
POLL_WAIT_S = 10.0  # a replica re-polls at least this often (its heartbeat)
STALE_AFTER_S = 3 * POLL_WAIT_S
SCRAPE_WAIT_S = 2.0  # the longest a scrape waits for the replicas' answers
RETRY_S = 1.0
FOLD_AFTER_S = 600.0  # departed replicas are folded into one sum after this long
OTHER_BUILD = -1  # what ``poll`` answers a replica of another build of the application
# Each replica holds one poll open at all times, and every scrape is one more call: far above any replica count.
HUB_MAX_ONGOING_REQUESTS = 4096


@dataclass
class _Member:
    kind: str
    snapshot: Snapshot
    answered: int  # the latest scrape generation this snapshot answers
    seen: float  # monotonic time of its latest poll
    late: bool = False  # missed a scrape's deadline: not waited for until it polls again


class MetricsHub:
    """Collects fresh snapshots from every live replica of one build of an application, on demand."""

    def __init__(self, build: str, poll_wait_s: float = POLL_WAIT_S, stale_after_s: float = STALE_AFTER_S):
        self.build = build
        self._poll_wait_s = poll_wait_s
        self._stale_after_s = stale_after_s
        # Wall-clock nanoseconds: a restarted hub starts above any generation a replica saw from the old one.
        self._generation = time.time_ns()
        self._members: dict[str, _Member] = {}
        self._departed: dict[str, tuple[float, Snapshot]] = {}  # member -> (when, its counters and histograms)
        self._folded = Snapshot()
        self._changed = asyncio.Condition()
        # Every Scorer replica watches the hub anyway: it also carries sleep and wake to all of them (sleep_board.py).
        self.sleep_board = SleepBoard(poll_wait_s, stale_after_s)

    async def poll(self, member: str, kind: str, answered: int, snapshot: Snapshot, build: str) -> int:
        """Store ``snapshot`` (answering scrape ``answered``), then wait for the next scrape; returns its generation.

        A replica of another ``build`` is not counted: it gets ``OTHER_BUILD`` at once.
        """
        if build != self.build:
            return OTHER_BUILD
        async with self._changed:
            self._departed.pop(member, None)  # back after being taken as gone: its snapshot is cumulative
            self._members[member] = _Member(kind, snapshot, answered, time.monotonic())
            self._changed.notify_all()
            with contextlib.suppress(asyncio.TimeoutError):  # no scrape for a while: answer anyway, as a heartbeat
                await asyncio.wait_for(self._changed.wait_for(lambda: self._generation > answered), self._poll_wait_s)
            return self._generation

    async def collect(self, wait_s: float = SCRAPE_WAIT_S) -> dict[str, Any]:
        """Start a scrape and return ``{"members": {id: (kind, snapshot, fresh)}, "departed": Snapshot}``."""
        async with self._changed:
            self._generation += 1
            target = self._generation
            self._changed.notify_all()
            awaited = [m for m, member in self._members.items() if not member.late]

            def answered() -> bool:
                return all(self._members[m].answered >= target for m in awaited if m in self._members)

            try:
                await asyncio.wait_for(self._changed.wait_for(answered), wait_s)
            except asyncio.TimeoutError:
                for m in awaited:
                    if m in self._members and self._members[m].answered < target:
                        self._members[m].late = True
            self._retire(target)
            members = {m: (x.kind, x.snapshot, x.answered >= target) for m, x in self._members.items()}
            return {"members": members, "departed": merge([self._folded, *(s for _, s in self._departed.values())])}

    async def watch_sleep(
        self, member: str, deployment: str, applied: int, level: int, error: Any, build: str
    ) -> Posted | int | None:
        """``SleepBoard.watch`` for a Scorer replica of this build (another build's gets ``OTHER_BUILD``)."""
        if build != self.build:
            return OTHER_BUILD
        return await self.sleep_board.watch(member, deployment, applied, level, error)

    async def set_sleep_level(self, deployment: str, level: int, timeout_s: float) -> dict[str, Any]:
        """``SleepBoard.set_level``: every replica of ``deployment`` to ``level`` (0 wakes them)."""
        return await self.sleep_board.set_level(deployment, level, timeout_s)

    def sleep_levels(self, deployment: str) -> list[int]:
        """``SleepBoard.levels``: the sleep level of each live replica of ``deployment``."""
        return self.sleep_board.levels(deployment)

    def _retire(self, target: int) -> None:
        now = time.monotonic()
        for m, member in list(self._members.items()):
            if member.answered < target and now - member.seen > self._stale_after_s:
                log.info("metrics: replica %s stopped reporting; keeping its counters in the totals", m)
                self._departed[m] = (now, member.snapshot.monotonic_part())
                del self._members[m]
        for m, (when, snapshot) in list(self._departed.items()):
            if now - when > FOLD_AFTER_S:
                self._folded.add(snapshot)
                del self._departed[m]


@dataclass
class HubLink:
    """How a replica reaches its application's hub: the ``MetricsHub`` deployment's handle and the build of the
    application that both belong to (``bind_hub`` makes one per ``build_app`` call)."""

    hub: Any  # a DeploymentHandle once Serve has deployed the application
    build: str


def bind_hub(resources: Mapping[str, float] | None = None) -> HubLink:
    """A new build's hub, to bind into every deployment of the application (one replica, zero CPUs; ``resources``
    places it, e.g. with the Gateway on the head node rather than on a GPU node that may go away)."""
    from ray import serve

    build = uuid.uuid4().hex
    hub = serve.deployment(
        MetricsHub,
        name=HUB_DEPLOYMENT,
        num_replicas=1,  # the one place the numbers meet: never more
        ray_actor_options={"num_cpus": 0, "resources": dict(resources or {})},
        max_ongoing_requests=HUB_MAX_ONGOING_REQUESTS,
        # Its open requests are long polls of replicas that stop with it: nothing to wait for at shutdown.
        graceful_shutdown_timeout_s=0,
        logging_config={"enable_access_log": False},  # every poll would be a line
    ).bind(build)
    return HubLink(hub, build)


async def report_metrics(link: HubLink, member: str, kind: str, snapshot: Callable[[], Snapshot]) -> None:
    """A replica's reporting loop (run it as a task for the replica's lifetime)."""
    generation, warned = 0, False
    while True:
        try:
            answer = await link.hub.poll.remote(member, kind, generation, snapshot(), link.build)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the hub is restarting, or not deployed yet
            if not warned:
                log.warning("metrics: cannot reach the metrics hub (%r); retrying", exc)
                warned = True
            await asyncio.sleep(RETRY_S)
            continue
        warned = False
        if answer == OTHER_BUILD:  # a redeploy is under way: the hub reached belongs to the other build
            await asyncio.sleep(RETRY_S)
            continue
        generation = answer


class HubProbeWarnings(logging.Filter):
    """Drops Serve's "Failed to get queue length from Replica(... deployment='MetricsHub' ...)" warnings.

    Serve's router asks a replica for its queue length, within 0.1 s, before each call; a replica's first call to the
    hub also opens its connection to the hub's actor, which on a busy machine (models loading at start-up) takes
    longer, so every replica logged it once or twice on a fresh start. For the hub that costs nothing (one replica; the
    router retries at once with a longer deadline, and a report is not urgent), so the warning says nothing an operator
    can act on. The same warning about a Scorer replica still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Failed to get queue length") and f"deployment='{HUB_DEPLOYMENT}'" in message)


def start_reporting(link: HubLink, kind: str, snapshot: Callable[[], Snapshot]) -> asyncio.Task:
    """Start ``report_metrics`` for the Serve replica this runs in (call on its event loop, e.g. in ``__init__``)."""
    from ray import serve

    serve_log = logging.getLogger("ray.serve")
    if not any(isinstance(f, HubProbeWarnings) for f in serve_log.filters):
        serve_log.addFilter(HubProbeWarnings())

    context = serve.get_replica_context()
    member = f"{context.deployment}#{context.replica_tag}"
    return asyncio.get_running_loop().create_task(report_metrics(link, member, kind, snapshot))


class ClusterMetrics:
    """A Gateway replica's metrics: its own recorder (HTTP metrics) and ``scrape()``, the totals of all replicas."""

    def __init__(self, link: HubLink, wait_s: float = SCRAPE_WAIT_S):
        self.recorder = MetricsRecorder()
        self.recorder.set("gateway_replicas", 1)
        self.wait_s = wait_s
        self.content_type = CONTENT_TYPE
        self.sources: list[Callable[[], Snapshot]] = []  # more of this replica's numbers (e.g. reward telemetry)
        self._hub = link.hub
        self._reporter = start_reporting(link, "gateway", self.snapshot)

    def snapshot(self) -> Snapshot:
        """This replica's numbers: its recorder and its ``sources``."""
        return merge([self.recorder.snapshot(), *(source() for source in self.sources)])

    async def scrape(self) -> bytes:
        result = await self._hub.collect.remote(self.wait_s)
        return render(totals(result))


def totals(collected: dict[str, Any]) -> Snapshot:
    """The totals of one ``MetricsHub.collect`` answer: every member's snapshot plus the departed replicas'."""
    return merge([collected["departed"], *(snapshot for _, snapshot, _ in collected["members"].values())])
