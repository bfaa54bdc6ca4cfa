"""Prometheus metrics for kvroom managers (opt-in).

``KVManager(..., metrics=KVMetrics())`` attaches a :class:`MetricsObserver` to
the manager's room table, next to the audit observer: it counts every room
creation and transition, failures by error type, bytes written (prefill) and
received (decode) by rooms that succeeded, and observes each room's latency
(creation to Success or Failed) and its time in each state.  Live rooms by
state and connected peers are read from the managers when scraped, so they
cost nothing on the transition path.  A manager built without ``metrics``
pays one ``None`` check per record.

Metric names (``namespace`` prefix, ``kvroom`` by default):

=====================================  =========  =========================================
``kvroom_rooms``                       gauge      live rooms by ``role``, ``state``
``kvroom_peers``                       gauge      connected peers by ``role``
``kvroom_rooms_created_total``         counter    rooms created by ``role``
``kvroom_room_transitions_total``      counter    by ``role``, ``src``, ``dst``, ``trigger``
``kvroom_room_failures_total``         counter    failed rooms by ``role``, ``error`` (type)
``kvroom_bytes_written_total``         counter    KV and aux bytes prefill wrote (Success)
``kvroom_bytes_received_total``        counter    KV and aux bytes decode received (Success)
``kvroom_room_latency_seconds``        histogram  creation to terminal, by ``role``, ``outcome``
``kvroom_room_state_seconds``          histogram  time spent in a state, by ``role``, ``state``
=====================================  =========  =========================================

Each :class:`KVMetrics` owns a :class:`~prometheus_client.CollectorRegistry`
unless given one, so several managers (or tests) never collide; managers that
share one ``KVMetrics`` add up.  :meth:`KVMetrics.serve` exposes ``/metrics``
over HTTP.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from kvroom.fsm import (
    TERMINAL,
    CleanupRecord,
    CreatedRecord,
    IgnoredRecord,
    KVPoll,
    Role,
    RoomTable,
    TransitionRecord,
)

if TYPE_CHECKING:
    from kvroom.planning import RankRegions


__all__ = ["KVMetrics", "MetricsObserver", "LATENCY_BUCKETS", "room_bytes"]


#: Seconds; from sub-millisecond rooms to the default deadlines.
class Observed(Protocol):
    """What the metrics read of a manager (it never imports :mod:`kvroom.manager`)."""

    @property
    def role(self) -> Role: ...

    @property
    def regions(self) -> RankRegions: ...

    @property
    def table(self) -> RoomTable: ...

    @property
    def side(self) -> Any: ...


LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip


class KVMetrics:
    """The metric families of one or more managers, in one registry.

    ``registry``: where to register (default: a new ``CollectorRegistry`` of
    its own; pass ``prometheus_client.REGISTRY`` to join the process-wide one,
    once per process).  ``namespace`` prefixes every name.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        namespace: str = "kvroom",
        buckets: Iterable[float] = LATENCY_BUCKETS,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.namespace = namespace
        reg, ns, buckets = self.registry, namespace, tuple(buckets)
        self.created = Counter(f"{ns}_rooms_created", "Rooms created", ["role"], registry=reg)
        self.transitions = Counter(
            f"{ns}_room_transitions",
            "Room state transitions (src == dst for internal ones)",
            ["role", "src", "dst", "trigger"],
            registry=reg,
        )
        self.failures = Counter(
            f"{ns}_room_failures", "Rooms that failed, by error type", ["role", "error"], registry=reg
        )
        self.bytes_written = Counter(
            f"{ns}_bytes_written", "KV and aux bytes prefill wrote for rooms that succeeded", registry=reg
        )
        self.bytes_received = Counter(
            f"{ns}_bytes_received", "KV and aux bytes decode received in rooms that succeeded", registry=reg
        )
        self.latency = Histogram(
            f"{ns}_room_latency_seconds",
            "Room creation to Success or Failed",
            ["role", "outcome"],
            buckets=buckets,
            registry=reg,
        )
        self.state_seconds = Histogram(
            f"{ns}_room_state_seconds",
            "Time a room spent in a state before leaving it",
            ["role", "state"],
            buckets=buckets,
            registry=reg,
        )
        self._live = _LiveCollector(ns)
        reg.register(self._live)

    def observer(self, manager: Observed) -> MetricsObserver:
        """A :class:`MetricsObserver` for ``manager``, whose live rooms and peers join the gauges."""
        self._live.managers.add(manager)
        return MetricsObserver(self, manager)

    def detach(self, manager: Observed) -> None:
        """Stop reporting ``manager``'s live rooms and peers (it closed)."""
        self._live.managers.discard(manager)

    def serve(self, port: int = 0, addr: str = "127.0.0.1") -> tuple[Any, threading.Thread]:
        """Serve ``/metrics`` over HTTP on a daemon thread; returns ``(server, thread)``.

        ``port=0`` picks a free port (``server.server_port``); ``server.shutdown()`` stops it.
        """
        server, thread = start_http_server(port, addr, registry=self.registry)
        return server, thread


class _LiveCollector:
    """Gauges read from the attached managers at scrape time."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.managers: weakref.WeakSet[Observed] = weakref.WeakSet()

    def collect(self) -> Iterator[Metric]:
        rooms = GaugeMetricFamily(f"{self.namespace}_rooms", "Live rooms by state", labels=["role", "state"])
        peers = GaugeMetricFamily(f"{self.namespace}_peers", "Connected peers", labels=["role"])
        by_state: dict[tuple[str, str], int] = {(r.value, s.name): 0 for r in Role for s in KVPoll}
        by_role: dict[str, int] = {r.value: 0 for r in Role}
        for manager in list(self.managers):
            table = getattr(manager, "table", None)
            if table is None:  # still being built
                continue
            role = manager.role.value
            for state, count in table.snapshot().items():
                by_state[(role, state)] += count
            by_role[role] += _peer_count(manager)
        for (role, state), count in by_state.items():
            rooms.add_metric([role, state], count)
        for role, count in by_role.items():
            peers.add_metric([role], count)
        yield rooms
        yield peers


def _peer_count(manager: Observed) -> int:
    side = getattr(manager, "side", None)
    for _ in range(3):  # the worker may change its peer tables while we read them
        try:
            return len(side.snapshot().get("peers", ())) if side is not None else 0
        except RuntimeError:
            continue
    return 0


def room_bytes(manager: Observed, room_id: int) -> int:
    """Bytes of KV (and aux) a live room moves: what prefill writes or decode receives.

    Prefill: the bytes of the WRITE descriptors it posted for the room (pages,
    aux and state rows).  Decode: its pages, aux row and state rows times the
    bytes of one item of every buffer of that index space.  Read from the room's stores, so
    only meaningful before the room is cleared.
    """
    if manager.role is Role.SENDER:  # what its WRITE descriptors moved, counted as they were posted
        plans = getattr(manager.side, "send_plans", None)
        send_plan = plans.get(room_id) if plans is not None else None
        return int(getattr(send_plan, "bytes_posted", 0))
    plans = getattr(manager.side, "plans", None)
    plan = plans.get(room_id) if plans is not None else None
    if plan is None:
        return 0
    per_item: dict[str, int] = {}  # bytes of one page (or row) of each index space, every buffer
    for buffer in manager.regions.layout.buffers():
        region = manager.regions.regions[buffer.key]
        per_item[buffer.space] = per_item.get(buffer.space, 0) + region.item_bytes
    total = int(plan.pages.size) * per_item.get("kv", 0)
    if plan.aux_index is not None:
        total += per_item.get("aux", 0)
    for space, rows in plan.state.items():
        total += len(rows) * per_item.get(space, 0)
    return total


class MetricsObserver:
    """Feeds one manager's room records into a :class:`KVMetrics` (an observer).

    Runs on the thread that fired the event, with the room's lock held; it
    does a few dict lookups and counter increments per record.
    """

    def __init__(self, metrics: KVMetrics, manager: Observed) -> None:
        self.metrics = metrics
        self.manager = manager
        self.role = manager.role
        role = self.role.value
        self._sender = self.role is Role.SENDER
        self._created = metrics.created.labels(role)
        self._bytes = metrics.bytes_written if self._sender else metrics.bytes_received
        self._transitions: dict[tuple[KVPoll, KVPoll, Any], Any] = {}
        self._failures: dict[str, Any] = {}
        self._state = {s: metrics.state_seconds.labels(role, s.name) for s in KVPoll}
        self._latency = {s: metrics.latency.labels(role, s.name) for s in TERMINAL}
        self._times: dict[int, tuple[float, float]] = {}  # live room -> (created, state entered)

    def on_create(self, record: CreatedRecord) -> None:
        """Count the room and remember when it was created."""
        self._created.inc()
        self._times[record.room] = (record.time, record.time)

    def on_transition(self, record: TransitionRecord) -> None:
        """Count the transition; at a state change observe the time spent in the old state."""
        src, dst = record.src, record.dst
        key = (src, dst, record.event)
        child = self._transitions.get(key)
        if child is None:
            child = self._transitions[key] = self.metrics.transitions.labels(
                self.role.value, src.name, dst.name, record.event.value
            )
        child.inc()
        if src is dst:
            return
        times = self._times.get(record.room)
        if times is not None:
            self._state[src].observe(record.time - times[1])
        if dst in TERMINAL:
            self._times.pop(record.room, None)
            if times is not None:
                self._latency[dst].observe(record.time - times[0])
            room = self.manager.table.get(record.room)  # still registered: cleanup runs after us
            if dst is KVPoll.Failed:
                error = room.error if room is not None else None
                name = type(error).__name__ if error is not None else "unknown"
                failures = self._failures.get(name)
                if failures is None:
                    failures = self._failures[name] = self.metrics.failures.labels(self.role.value, name)
                failures.inc()
            else:
                self._bytes.inc(room_bytes(self.manager, record.room))
        elif times is not None:
            self._times[record.room] = (times[0], record.time)

    def on_cleanup(self, record: CleanupRecord) -> None:
        """Nothing to count (rooms by state are read at scrape time)."""

    def on_ignored(self, record: IgnoredRecord) -> None:
        """Nothing to count."""

    def close(self) -> None:
        """The manager closed: forget its rooms and leave the live gauges."""
        self.metrics.detach(self.manager)
        self._times.clear()
