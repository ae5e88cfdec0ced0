"""``MetricsHub``: one small Ray actor per application that gathers every replica's metrics for ``GET /metrics``.

A ``DeploymentHandle`` call reaches *one* replica, chosen by Serve's router, so ``/metrics`` cannot ask
the Scorers through the handle. Instead every replica (Scorer and Gateway) runs ``report_metrics``, a
long poll against the hub: it hands the hub its ``Snapshot`` and waits until a scrape starts; the
scrape (``MetricsHub.collect``) wakes all of them, and each answers with a snapshot taken *after* the
scrape began, so work finished before the scrape is always in it. ``collect`` waits at most
``wait_s`` for the answers; a replica that does not answer in time (dead, or its event loop stuck)
counts with its last snapshot and is not waited for again until it polls again. A replica that has
not polled for ``stale_after_s`` is taken as gone: its counters and histograms stay in the totals,
its gauges leave them. A restarted replica has a new identity and starts from zero; if the hub
itself is lost, the next replica to poll creates a new one and the totals restart (a counter reset,
which Prometheus' ``rate()`` handles).

The hub is a detached, zero-CPU named actor (``rmserve-metrics:<app>`` in namespace ``rmserve``), so
it outlives the replicas that created it; it ends with the Ray cluster. Its logic is plain asyncio,
testable without Ray: ``hub = MetricsHub(); await hub.collect(0.1)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .metrics import CONTENT_TYPE, MetricsRecorder, Snapshot, merge, render

log = logging.getLogger("rmserve.serve")

HUB_NAMESPACE = "rmserve"
POLL_WAIT_S = 10.0  # a replica re-polls at least this often (its heartbeat)
STALE_AFTER_S = 3 * POLL_WAIT_S
SCRAPE_WAIT_S = 2.0  # the longest a scrape waits for the replicas' answers
RETRY_S = 1.0
FOLD_AFTER_S = 600.0  # departed replicas are folded into one sum after this long


@dataclass
class _Member:
    kind: str
    snapshot: Snapshot
    answered: int  # the latest scrape generation this snapshot answers
    seen: float  # monotonic time of its latest poll
    late: bool = False  # missed a scrape's deadline: not waited for until it polls again


class MetricsHub:
    """Collects fresh snapshots from every live replica of one application on demand."""

    def __init__(self, poll_wait_s: float = POLL_WAIT_S, stale_after_s: float = STALE_AFTER_S):
        self._poll_wait_s = poll_wait_s
        self._stale_after_s = stale_after_s
        # Wall-clock nanoseconds: a re-created hub starts above any generation a replica saw from the old one.
        self._generation = time.time_ns()
        self._members: dict[str, _Member] = {}
        self._departed: dict[str, tuple[float, Snapshot]] = {}  # member -> (when, its counters and histograms)
        self._folded = Snapshot()
        self._changed = asyncio.Condition()

    async def poll(self, member: str, kind: str, answered: int, snapshot: Snapshot) -> int:
        """Store ``snapshot`` (answering scrape ``answered``), then wait for the next scrape; returns its generation."""
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


def hub_name(app_name: str) -> str:
    return f"rmserve-metrics:{app_name}"


def get_hub(app_name: str) -> Any:
    """The application's hub actor, created on first use (detached, zero CPUs)."""
    import ray

    return (
        ray.remote(MetricsHub)
        .options(
            name=hub_name(app_name),
            namespace=HUB_NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            max_concurrency=4096,
        )
        .remote()
    )


async def report_metrics(app_name: str, member: str, kind: str, snapshot: Callable[[], Snapshot]) -> None:
    """A replica's reporting loop (run it as a task for the replica's lifetime)."""
    generation, hub, warned = 0, None, False
    while True:
        try:
            if hub is None:
                hub = get_hub(app_name)
            generation = await hub.poll.remote(member, kind, generation, snapshot())
            warned = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the hub died or is restarting: find or create it again
            if not warned:
                log.warning("metrics: cannot reach the metrics hub (%r); retrying", exc)
                warned = True
            hub = None
            await asyncio.sleep(RETRY_S)


def start_reporting(kind: str, snapshot: Callable[[], Snapshot]) -> asyncio.Task:
    """Start ``report_metrics`` for the Serve replica this runs in (call on its event loop, e.g. in ``__init__``)."""
    from ray import serve

    context = serve.get_replica_context()
    member = f"{context.deployment}#{context.replica_tag}"
    return asyncio.get_running_loop().create_task(report_metrics(context.app_name, member, kind, snapshot))


class ClusterMetrics:
    """A Gateway replica's metrics: its own recorder (HTTP metrics) and ``scrape()``, the totals of all replicas."""

    def __init__(self, wait_s: float = SCRAPE_WAIT_S):
        from ray import serve

        self.app_name = serve.get_replica_context().app_name
        self.recorder = MetricsRecorder()
        self.recorder.set("gateway_replicas", 1)
        self.wait_s = wait_s
        self.content_type = CONTENT_TYPE
        self.sources: list[Callable[[], Snapshot]] = []  # more of this replica's numbers (e.g. reward telemetry)
        self._hub: Any = None
        self._reporter = start_reporting("gateway", self.snapshot)

    def snapshot(self) -> Snapshot:
        """This replica's numbers: its recorder and its ``sources``."""
        return merge([self.recorder.snapshot(), *(source() for source in self.sources)])

    async def scrape(self) -> bytes:
        try:
            if self._hub is None:
                self._hub = get_hub(self.app_name)
            result = await self._hub.collect.remote(self.wait_s)
        except Exception:
            self._hub = None
            raise
        return render(merge([result["departed"], *(snapshot for _, snapshot, _ in result["members"].values())]))


class LocalMetrics:
    """One process's metrics only (``create_http_app`` without Ray, e.g. in unit tests)."""

    def __init__(self) -> None:
        self.recorder = MetricsRecorder()
        self.recorder.set("gateway_replicas", 1)
        self.content_type = CONTENT_TYPE
        self.sources: list[Callable[[], Snapshot]] = []

    async def scrape(self) -> bytes:
        return render(merge([self.recorder.snapshot(), *(source() for source in self.sources)]))
