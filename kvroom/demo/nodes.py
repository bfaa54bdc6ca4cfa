"""Prefill and decode *scheduler* processes driving kvroom's public API.

Each node runs a loop like an engine's scheduler: it takes rooms from its
parent over a pipe, allocates pages, creates ``KVSender``/``KVReceiver`` objects
and reports every terminal room (outcome, error, verification, footprint).
The loop is event-driven: an observer on the manager writes to a pipe when a
room changes state, and the loop sleeps on that pipe and its parent's pipe
(or, with ``chunk_interval`` > 0, steps on a fixed tick).  The pool is a model
preset's buffers or opaque pages (:mod:`kvroom.demo.buffers`); their contents
come from patterns made once per process, stamped per room.  The demo,
the end-to-end tests and the soak all use these nodes.

Parent -> node messages: ``("rooms", [RoomSpec...])``, ``("abort", room)``,
``("stop", None)``, and for the raw NIXL figure ``("raw_open", None)``,
``("raw_run", plan)``, ``("raw_close", None)``.  Node -> parent: ``("ready",
info)``, ``("done", RoomResult)``, ``("metrics", families)``, ``("raw", info)``,
``("final", summary)``, ``("error", text)``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from kvroom.demo.buffers import DemoBuffers, make_buffers
from kvroom.demo.workload import PageAllocator, RoomSpec
from kvroom.node.wake import WakeQueue

__all__ = ["NodeOptions", "RoomResult", "prefill_main", "decode_main", "die_with_parent"]


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphans)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - not Linux
        pass
    if os.getppid() == 1:  # parent already gone
        os._exit(1)


@dataclass(frozen=True)
class NodeOptions:
    """Everything a node needs, picklable."""

    layers: int = 4  # pool tensors (K and V of a model layer are two)
    page_bytes: int = 16 << 10  # bytes of one page of one tensor
    pool_pages: int = 2048
    aux_slots: int = 256
    aux_bytes: int = 64
    chunk_pages: int = 8
    concurrency: int = 32
    port: int = 0
    bootstrap_addr: str = ""
    host: str = "127.0.0.1"
    audit_log: str | None = None
    deadlines: tuple[float | None, float | None, float | None] = (30.0, 120.0, 30.0)
    heartbeat: tuple[float, float] = (0.25, 3.0)
    name: str = "node"
    env: dict[str, str] = field(default_factory=dict)
    stderr_path: str | None = None  # where the node's stderr (NIXL's own logs) goes
    # a preset of kvroom.presets (its buffers, aux and state rows) with ``model_layers`` layers
    # (None: the preset's); None: ``layers`` opaque uint8 tensors of ``page_bytes`` pages
    model: str | None = None
    model_layers: int | None = None
    # a directory with the CURVE pairs prefill.key(_secret) and decode.key(_secret); None: no keys
    keys_dir: str | None = None
    # 0: event-driven loops, a room's chunks all sent at once (the demo); > 0: a scheduler
    # step, then a sleep this long: each step polls every room and sends one chunk a room,
    # so faults land mid-transfer (chaos).  Both stamp and check pages the same cheap way.
    chunk_interval: float = 0.001
    metrics_interval: float | None = None  # send metric snapshots this often (None: no metrics)
    seed: int = 0  # of the page pattern (the same on every node)


@dataclass
class RoomResult:
    """What happened to one room on one node.

    ``started``: creation (prefill) or page list sent (decode); ``finished``:
    its terminal transition (both ``time.monotonic()``, comparable across processes).
    """

    room: int
    role: str
    node: str
    state: str
    error: str | None
    error_type: str | None
    verified: bool | None
    footprint: tuple[str, ...]
    started: float
    finished: float
    bytes: int
    pages: int = 0  # pages moved (the request's, less decode's cached prefix)


class _Wake:
    """The manager's observer: forwards to the audit observer and wakes the scheduler loop.

    A room's state change queues its id on a :class:`~kvroom.node.wake.WakeQueue`
    the loop sleeps on (one wake-up byte while any is pending: each
    ``os.write`` on kvroom's worker lets go of the GIL).  Terminal transitions
    also keep their time.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.queue: WakeQueue[int] = WakeQueue()
        self.fd = self.queue.fd
        self.ended: dict[int, float] = {}

    def on_create(self, record: Any) -> None:
        if self.inner is not None:
            self.inner.on_create(record)

    def on_transition(self, record: Any) -> None:
        if self.inner is not None:
            self.inner.on_transition(record)
        if record.src is not record.dst:
            if record.dst.name in ("Success", "Failed"):
                self.ended[record.room] = record.time
            self.queue.put(record.room)

    def on_cleanup(self, record: Any) -> None:
        if self.inner is not None:
            self.inner.on_cleanup(record)

    def on_ignored(self, record: Any) -> None:
        if self.inner is not None:
            self.inner.on_ignored(record)

    def take(self) -> list[int]:
        """Rooms that changed since the last call."""
        return self.queue.take()

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
        self.queue.close()


def _make_manager(role: str, opts: NodeOptions, wake: _Wake, metrics: Any) -> tuple[Any, DemoBuffers]:
    """The manager and the buffers behind its pool."""
    from kvroom import KVManager, ManagerConfig
    from kvroom.fsm import Deadlines

    layers = (opts.model_layers or 0) if opts.model else opts.layers
    buffers = make_buffers(
        opts.model, layers, opts.pool_pages, opts.aux_slots, opts.page_bytes, opts.aux_bytes, opts.seed
    )
    config = ManagerConfig(
        deadlines=Deadlines(*opts.deadlines),
        heartbeat_interval=opts.heartbeat[0],
        heartbeat_timeout=opts.heartbeat[1],
        host=opts.host,
        keys=_keys(role, opts.keys_dir),
    )
    import structlog

    quiet = structlog.wrap_logger(structlog.PrintLogger(open(os.devnull, "w")))  # noqa: SIM115
    manager = KVManager(
        role, buffers.pool, bootstrap_port=opts.port, config=config, observer=wake, audit=False, logger=quiet,
        metrics=metrics,
    )  # fmt: skip
    return manager, buffers


def _keys(role: str, keys_dir: str | None) -> Any:
    """This node's CURVE keys: its own pair, trusting only the other role's public key."""
    if keys_dir is None:
        return None
    from kvroom import CurveKeys

    other = "decode" if role == "prefill" else "prefill"
    return CurveKeys.load(
        os.path.join(keys_dir, f"{role}.key_secret"), [os.path.join(keys_dir, f"{other}.key")]
    )


def _result(
    handle: Any, state: Any, role: str, opts: NodeOptions, started: float, finished: float,
    verified: bool | None, nbytes: int,
) -> RoomResult:  # fmt: skip
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


def _node(role: str, conn: Connection, opts: NodeOptions) -> None:
    die_with_parent()
    os.environ.update(opts.env)
    if opts.stderr_path:
        fd = os.open(opts.stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)  # NIXL logs to stdout: keep the demo's own output (and --json) clean
        os.dup2(fd, 2)
        os.close(fd)
    audit = None
    if opts.audit_log:
        from kvroom.observe.audit import AuditObserver, BackgroundObserver, json_lines_logger

        audit = BackgroundObserver(  # rendered on a writer thread, off the scheduler's
            AuditObserver(
                json_lines_logger(opts.audit_log), process=f"{opts.name}-{os.getpid()}", pid=os.getpid()
            )
        )
    wake = _Wake(audit)
    metrics = None
    if opts.metrics_interval is not None:
        from kvroom.observe.metrics import KVMetrics

        metrics = KVMetrics()
    try:
        manager, buffers = _make_manager(role, opts, wake, metrics)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        wake.close()
        return
    try:
        conn.send(
            ("ready", {"addr": manager.bootstrap_addr, "pid": os.getpid(), "agent": manager.agent_name})
        )
        cls = PrefillLoop if role == "prefill" else DecodeLoop
        loop = cls(manager, conn, opts, wake, buffers, metrics)
        loop.run()
        if audit is not None:
            audit.flush()  # every record on disk before the parent may read the log
        final: dict[str, Any] = {"snapshot": manager.snapshot(), "unexpected": loop.unexpected}
        if metrics is not None:
            final["metrics"] = list(metrics.registry.collect())
        conn.send(("final", final))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        manager.close()
        wake.close()


def prefill_main(conn: Connection, opts: NodeOptions) -> None:
    """Entry point of a prefill node process."""
    _node("prefill", conn, opts)


def decode_main(conn: Connection, opts: NodeOptions) -> None:
    """Entry point of a decode node process."""
    _node("decode", conn, opts)


class _Loop:
    role = ""

    def __init__(
        self,
        manager: Any,
        conn: Connection,
        opts: NodeOptions,
        wake: _Wake,
        buffers: DemoBuffers,
        metrics: Any,
    ) -> None:
        self.m = manager
        self.conn = conn
        self.opts = opts
        self.wake = wake
        self.buffers = buffers
        self.metrics = metrics
        self.queue: deque[RoomSpec] = deque()
        self.live: dict[int, dict[str, Any]] = {}
        self.pages = PageAllocator(opts.pool_pages)
        self.slots = list(range(opts.aux_slots))
        self.stopping = False
        self.unexpected: list[str] = []  # exceptions that escaped send()/poll()
        self.abort_requested: set[int] = set()
        self.raw: Any = None
        self._next_metrics = 0.0

    def _timeout(self) -> float | None:
        now = time.monotonic()
        if self.opts.metrics_interval is None:
            return None
        return max(0.0, self._next_metrics - now)

    def run(self) -> None:
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
        now = time.monotonic()
        if self.opts.metrics_interval is not None and now >= self._next_metrics:
            self._next_metrics = now + self.opts.metrics_interval
            self.conn.send(("metrics", list(self.metrics.registry.collect())))

    def guarded(self, room_id: int, step: Any) -> None:
        try:
            step(room_id)
        except Exception as exc:  # must never happen: send()/poll() raise no transport errors
            self.unexpected.append(f"room {room_id}: {type(exc).__name__}: {exc}")
            if room_id in self.live:
                self.finish(room_id, None)

    def on_message(self, kind: str, arg: Any) -> None:
        if kind == "rooms":
            self.queue.extend(arg)
        elif kind == "abort":
            entry = self.live.get(arg)
            if entry is not None:
                entry["handle"].abort()
            else:  # not admitted yet: abort it as soon as it is
                self.abort_requested.add(arg)
        elif kind == "stop":
            self.stopping = True
            self.queue.clear()
            for entry in self.live.values():
                entry["handle"].abort("node stopping")
        elif kind.startswith("raw_"):
            self.on_raw(kind, arg)

    def on_raw(self, kind: str, arg: Any) -> None:
        if kind == "raw_open":
            self.raw = self.raw_agent()
            self.conn.send(("raw", self.raw.info()))
        elif kind == "raw_close" and self.raw is not None:
            self.raw.close()
            self.raw = None
            self.conn.send(("raw", {"closed": True}))

    def raw_agent(self) -> Any:
        """A bare NIXL agent over the pool's largest KV page group."""
        from kvroom.demo.raw import RawAgent

        group = self.buffers.raw_group
        return RawAgent(self.role, group.tensors, self.opts.pool_pages, group.block.shape[2])

    def idle(self) -> None:
        """Called once per loop turn (decode drives its raw agent here)."""

    def admit(self) -> None:
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
            self.live[spec.room] = {
                "spec": spec,
                "handle": handle,
                "pages": pages,
                "slot": slot,
                "started": time.monotonic(),
                "sent": 0,
                "ready": False,
            }
            if spec.room in self.abort_requested:
                self.abort_requested.discard(spec.room)
                handle.abort()
            if self.opts.chunk_interval <= 0:  # event-driven: no tick will look at it
                self.guarded(spec.room, self.advance)

    def create(self, spec: RoomSpec, pages: torch.Tensor, slot: int) -> Any:
        raise NotImplementedError

    def advance(self, room_id: int) -> None:
        raise NotImplementedError

    def finish(self, room_id: int, verified: bool | None) -> None:
        entry = self.live.pop(room_id)
        handle, spec = entry["handle"], entry["spec"]
        nbytes = (spec.pages - spec.prefix_pages) * self.buffers.page_bytes
        state = handle.poll()  # the handle is spent once cleared
        try:
            handle.clear()
        except Exception as exc:
            self.unexpected.append(f"room {room_id}: clear: {type(exc).__name__}: {exc}")
        finished = self.wake.ended.pop(room_id, None) or time.monotonic()
        result = _result(handle, state, self.role, self.opts, entry["started"], finished, verified, nbytes)
        result.pages = spec.pages - spec.prefix_pages
        self.pages.release(entry["pages"])
        self.slots.append(entry["slot"])
        self.conn.send(("done", result))


class PrefillLoop(_Loop):
    """A prefill scheduler: stamp a room's pages, send its chunks once decode is ready."""

    role = "prefill"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.buffers.prepare()  # the pool's "KV", computed once

    def create(self, spec: RoomSpec, pages: torch.Tensor, slot: int) -> Any:
        from kvroom import KVSender

        sender = KVSender(self.m, self.m.bootstrap_addr, spec.room)
        self.buffers.stamp(spec.room, spec.pages, spec.prefix_pages, pages, slot)  # its forward pass
        return sender

    def advance(self, room_id: int) -> None:
        from kvroom import KVPoll

        entry = self.live[room_id]
        state = entry["handle"].poll()
        if state in (KVPoll.Success, KVPoll.Failed):
            self.finish(room_id, None)
            return
        if state is KVPoll.Bootstrapping:
            return
        spec = entry["spec"]
        if not entry["ready"]:
            entry["handle"].init(spec.pages, aux_index=entry["slot"])
            entry["ready"] = True
        if self.opts.chunk_interval <= 0:  # event-driven: every chunk now
            while entry["sent"] < spec.pages:
                self.send_chunk(entry)
        elif entry["sent"] < spec.pages:  # ticks: one chunk per tick
            self.send_chunk(entry)

    def send_chunk(self, entry: dict[str, Any]) -> None:
        sent, pages = entry["sent"], entry["pages"]
        chunk = pages[sent : sent + self.opts.chunk_pages]
        last = sent + chunk.numel() >= pages.numel()
        state = self.buffers.state_indices(pages, entry["slot"]) if last else None
        entry["handle"].send(chunk, state_indices=state)
        entry["sent"] = sent + chunk.numel()

    def on_raw(self, kind: str, arg: Any) -> None:
        if kind == "raw_run":
            from kvroom.demo.raw import raw_writes

            agent = self.raw_agent()
            try:
                self.conn.send(("raw", raw_writes(agent, **arg)))
            finally:
                agent.close()
        else:
            super().on_raw(kind, arg)


class DecodeLoop(_Loop):
    """A decode scheduler: send page lists, verify what arrives, free pages on Failed."""

    role = "decode"

    def create(self, spec: RoomSpec, pages: torch.Tensor, slot: int) -> Any:
        from kvroom import KVReceiver

        receiver = KVReceiver(self.m, self.opts.bootstrap_addr, spec.room)
        receiver.init()
        if self.opts.chunk_interval <= 0:
            self.send_metadata(receiver, spec, pages, slot)
        return receiver

    def send_metadata(self, receiver: Any, spec: RoomSpec, pages: torch.Tensor, slot: int) -> None:
        prefix = spec.prefix_pages
        self.buffers.clear(spec.pages, prefix, pages, slot)
        receiver.send_metadata(
            pages[prefix:], aux_index=slot, decode_prefix_len=prefix * self.buffers.page_size,
            state_indices=self.buffers.state_indices(pages, slot),
        )  # fmt: skip

    def advance(self, room_id: int) -> None:
        from kvroom import KVPoll

        entry = self.live[room_id]
        spec, pages = entry["spec"], entry["pages"]
        if not entry["ready"]:
            entry["ready"] = True
            if self.opts.chunk_interval > 0:  # stepping: the page list goes out on the first step
                self.send_metadata(entry["handle"], spec, pages, entry["slot"])
                return
        state = entry["handle"].poll()
        if state is KVPoll.Success:
            self.finish(
                room_id, self.buffers.check(spec.room, spec.pages, spec.prefix_pages, pages, entry["slot"])
            )
        elif state is KVPoll.Failed:
            self.finish(room_id, None)

    def _timeout(self) -> float | None:
        timeout = super()._timeout()
        return 0.001 if self.raw is not None else timeout  # keep the raw agent progressing

    def idle(self) -> None:
        if self.raw is not None:
            self.raw.drain()
