"""The scheduler loop a demo node runs, what both roles share (:mod:`kvroom.demo.loops` adds each role's).

A node's loop is an engine scheduler's in miniature: it takes rooms from its
parent over a pipe, admits them while it has pages, aux slots and room under
``concurrency``, creates the room's handle (``KVSender``/``KVReceiver``),
advances it as kvroom reports state changes, and on a terminal state clears
the handle, frees its pages and reports a :class:`~kvroom.demo.node_options.RoomResult`.

Two ways to run it:

* event-driven (``chunk_interval`` 0, the demo): sleep on the parent's pipe
  and the :class:`~kvroom.demo.observer.WakeObserver` pipe, advance only the
  rooms that changed;
* stepping (``chunk_interval`` > 0, chaos and the fault tests): every tick,
  poll every live room, so faults land mid-transfer.

Parent -> node messages: ``("rooms", [RoomSpec...])``, ``("abort", room)``,
``("stop", None)``, and the raw NIXL phase's ``("raw_...", arg)``
(:mod:`kvroom.demo.compare`); node -> parent: ``("done", RoomResult)``,
``("metrics", families)`` and ``("raw", info)``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from kvroom.demo.buffers import DemoBuffers
from kvroom.demo.node_options import NodeOptions, RoomResult
from kvroom.demo.observer import WakeObserver
from kvroom.demo.workload import PageAllocator, RoomSpec

if TYPE_CHECKING:
    from kvroom.demo.raw import RawAgent
    from kvroom.fsm import KVPoll
    from kvroom.manager import KVManager
    from kvroom.observe.metrics import KVMetrics
    from kvroom.receiver import KVReceiver
    from kvroom.sender import KVSender

__all__ = ["LiveRoom", "SchedulerLoop", "room_result"]

H = TypeVar("H", "KVSender", "KVReceiver")


@dataclass
class LiveRoom(Generic[H]):
    """A room admitted on this node, until its terminal state is reported."""

    spec: RoomSpec
    handle: H
    pages: torch.Tensor  # the request's pages in this node's pool
    slot: int  # its aux (and mamba state) row
    started: float
    sent: int = 0  # prefill: pages sent so far
    ready: bool = False  # prefill: init() called; decode: page list sent


def room_result(
    handle: KVSender | KVReceiver, state: KVPoll, role: str, opts: NodeOptions, started: float,
    finished: float, verified: bool | None, nbytes: int,
) -> RoomResult:  # fmt: skip
    """The report of one terminal room (its error, if Failed, and what it left behind)."""
    from kvroom import KVPoll

    error = error_type = None
    if state is KVPoll.Failed:
        try:
            handle.failure_exception()
        except BaseException as exc:
            error, error_type = str(exc), type(exc).__name__
    return RoomResult(
        room=handle.bootstrap_room,
        role=role,
        node=opts.name,
        state=state.name,
        error=error,
        error_type=error_type,
        verified=verified,
        footprint=tuple(sorted(handle.manager.footprint(handle.bootstrap_room))),
        started=started,
        finished=finished,
        bytes=nbytes,
    )


class SchedulerLoop(Generic[H]):
    """What both roles' loops share: messages, admission, the two ways to run, reporting."""

    role = ""

    def __init__(
        self,
        manager: KVManager,
        conn: Connection,
        opts: NodeOptions,
        wake: WakeObserver,
        buffers: DemoBuffers,
        metrics: KVMetrics | None,
    ) -> None:
        self.m = manager
        self.conn = conn
        self.opts = opts
        self.wake = wake
        self.buffers = buffers
        self.metrics = metrics
        self.queue: deque[RoomSpec] = deque()
        self.live: dict[int, LiveRoom[H]] = {}
        self.pages = PageAllocator(opts.pool_pages)
        self.slots = list(range(opts.aux_slots))
        self.stopping = False
        self.unexpected: list[str] = []  # exceptions that escaped send()/poll()
        self.abort_requested: set[int] = set()
        self.raw: RawAgent | None = None  # the bare NIXL agent of the raw phase, while open
        self._next_metrics = 0.0

    def _timeout(self) -> float | None:
        now = time.monotonic()
        if self.opts.metrics_interval is None:
            return None
        return max(0.0, self._next_metrics - now)

    def run(self) -> None:
        """Run until stopped and every room is reported."""
        if self.opts.chunk_interval > 0:
            self.run_ticks()
            return
        while not (self.stopping and not self.live and not self.queue):
            wait([self.conn, self.wake.fd], self._timeout())
            while self.conn.poll(0):
                self.on_message(*self.conn.recv())
            for room_id in self.wake.take():
                if room_id in self.live:
                    self.guarded(room_id, self.advance)
            self.admit()  # after finishing rooms: their pages and slots are free again
            self.idle()
            self.report_metrics()

    def run_ticks(self) -> None:
        """A scheduler step every ``chunk_interval``: poll every live room, one chunk each."""
        while not (self.stopping and not self.live and not self.queue):
            while self.conn.poll(0):
                self.on_message(*self.conn.recv())
            self.wake.take()
            self.admit()
            for room_id in list(self.live):
                self.guarded(room_id, self.advance)
            self.idle()
            self.report_metrics()
            time.sleep(self.opts.chunk_interval)

    def report_metrics(self) -> None:
        """Send the metric families to the parent every ``metrics_interval``."""
        now = time.monotonic()
        if self.metrics is not None and self.opts.metrics_interval is not None and now >= self._next_metrics:
            self._next_metrics = now + self.opts.metrics_interval
            self.conn.send(("metrics", list(self.metrics.registry.collect())))

    def guarded(self, room_id: int, step: Callable[[int], None]) -> None:
        """Run ``step(room_id)``; an exception is recorded as unexpected and ends the room."""
        try:
            step(room_id)
        except Exception as exc:  # must never happen: send()/poll() raise no transport errors
            self.unexpected.append(f"room {room_id}: {type(exc).__name__}: {exc}")
            if room_id in self.live:
                self.finish(room_id, None)

    def on_message(self, kind: str, arg: Any) -> None:
        """One message from the parent."""
        if kind == "rooms":
            self.queue.extend(arg)
        elif kind == "abort":
            entry = self.live.get(arg)
            if entry is not None:
                entry.handle.abort()
            else:  # not admitted yet: abort it as soon as it is
                self.abort_requested.add(arg)
        elif kind == "stop":
            self.stopping = True
            self.queue.clear()
            for entry in self.live.values():
                entry.handle.abort("node stopping")
        elif kind.startswith("raw_"):
            self.on_raw(kind, arg)

    def on_raw(self, kind: str, arg: Any) -> None:
        """The raw phase's messages both roles answer: open and close the bare agent."""
        if kind == "raw_open":
            self.raw = self.raw_agent()
            self.conn.send(("raw", self.raw.info()))
        elif kind == "raw_close" and self.raw is not None:
            stats = self.raw.close()
            self.raw = None
            self.conn.send(("raw", {"closed": True, **stats}))

    def raw_agent(self) -> RawAgent:
        """A bare NIXL agent over the pool's largest KV page group."""
        from kvroom.demo.raw import RawAgent

        group = self.buffers.raw_group
        return RawAgent(self.role, group.tensors, self.opts.pool_pages, group.block.shape[2])

    def idle(self) -> None:
        """Called once per loop turn (decode drives its raw agent here)."""

    def admit(self) -> None:
        """Admit queued rooms while pages, slots and ``concurrency`` allow."""
        while self.queue and len(self.live) < self.opts.concurrency and self.slots:
            spec = self.queue[0]
            pages = self.pages.alloc(spec.pages)
            if pages is None:
                return
            self.queue.popleft()
            slot = self.slots.pop()
            try:
                handle = self.create(spec, pages, slot)
            except Exception as exc:
                self.unexpected.append(f"room {spec.room}: create: {type(exc).__name__}: {exc}")
                self.pages.release(pages)
                self.slots.append(slot)
                continue
            self.live[spec.room] = LiveRoom(spec, handle, pages, slot, time.monotonic())
            if spec.room in self.abort_requested:
                self.abort_requested.discard(spec.room)
                handle.abort()
            if self.opts.chunk_interval <= 0:  # event-driven: no tick will look at it
                self.guarded(spec.room, self.advance)

    def create(self, spec: RoomSpec, pages: torch.Tensor, slot: int) -> H:
        """The room's handle (the role's part)."""
        raise NotImplementedError

    def advance(self, room_id: int) -> None:
        """Move a live room on after kvroom reported a change (the role's part)."""
        raise NotImplementedError

    def finish(self, room_id: int, verified: bool | None) -> None:
        """Clear a terminal room's handle, free its pages and slot, report its result."""
        entry = self.live.pop(room_id)
        handle, spec = entry.handle, entry.spec
        nbytes = (spec.pages - spec.prefix_pages) * self.buffers.page_bytes
        state = handle.poll()  # the handle is spent once cleared
        try:
            handle.clear()
        except Exception as exc:
            self.unexpected.append(f"room {room_id}: clear: {type(exc).__name__}: {exc}")
        finished = self.wake.ended.pop(room_id, None) or time.monotonic()
        result = room_result(handle, state, self.role, self.opts, entry.started, finished, verified, nbytes)
        result.pages = spec.pages - spec.prefix_pages
        self.pages.release(entry.pages)
        self.slots.append(entry.slot)
        self.conn.send(("done", result))
