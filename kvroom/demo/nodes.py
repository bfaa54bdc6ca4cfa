"""Prefill and decode *scheduler* processes driving kvroom's public API.

Each node runs a loop like an engine's scheduler: it takes rooms from its
parent over a pipe, allocates pages, creates ``KVSender``/``KVReceiver`` objects,
polls them, and reports every terminal room (outcome, error, verification,
footprint).  The demo, the end-to-end tests and the soak all use these.

Parent -> node messages: ``("rooms", [RoomSpec...])``, ``("abort", room)``,
``("stop", None)``.  Node -> parent: ``("ready", info)``, ``("done", RoomResult)``,
``("final", summary)``, ``("error", text)``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from kvroom.demo.buffers import DemoBuffers, make_buffers
from kvroom.demo.workload import PageAllocator, RoomSpec

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

    layers: int = 4
    page_bytes: int = 16 << 10
    model: str | None = None  # a preset of kvroom.presets instead of opaque pages
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


@dataclass
class RoomResult:
    """What happened to one room on one node."""

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


def _make_manager(role: str, opts: NodeOptions) -> tuple[Any, DemoBuffers]:
    from kvroom import KVManager, ManagerConfig
    from kvroom.audit import AuditObserver, json_lines_logger
    from kvroom.fsm import Deadlines

    buffers = make_buffers(opts.model, opts.pool_pages, opts.aux_slots, opts.layers, opts.page_bytes)
    config = ManagerConfig(
        deadlines=Deadlines(*opts.deadlines),
        heartbeat_interval=opts.heartbeat[0],
        heartbeat_timeout=opts.heartbeat[1],
        host=opts.host,
    )
    observer = None
    if opts.audit_log:
        observer = AuditObserver(
            json_lines_logger(opts.audit_log), process=f"{opts.name}-{os.getpid()}", pid=os.getpid()
        )
    import structlog

    quiet = structlog.wrap_logger(structlog.PrintLogger(open(os.devnull, "w")))  # noqa: SIM115
    manager = KVManager(
        role,
        buffers.pool,
        bootstrap_port=opts.port,
        config=config,
        observer=observer,
        audit=False,
        logger=quiet,
    )
    return manager, buffers


def _result(
    handle: Any, state: Any, role: str, opts: NodeOptions, started: float, verified: bool | None, nbytes: int
) -> RoomResult:
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
        finished=time.monotonic(),
        bytes=nbytes,
    )


def _node(role: str, conn: Connection, opts: NodeOptions) -> None:
    die_with_parent()
    os.environ.update(opts.env)
    if opts.stderr_path:
        fd = os.open(opts.stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
    try:
        manager, buffers = _make_manager(role, opts)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    try:
        conn.send(
            ("ready", {"addr": manager.bootstrap_addr, "pid": os.getpid(), "agent": manager.agent_name})
        )
        loop = (PrefillLoop if role == "prefill" else DecodeLoop)(manager, conn, opts, buffers)
        loop.run()
        conn.send(("final", {"snapshot": manager.snapshot(), "unexpected": loop.unexpected}))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        manager.close()


def prefill_main(conn: Connection, opts: NodeOptions) -> None:
    """Entry point of a prefill node process."""
    _node("prefill", conn, opts)


def decode_main(conn: Connection, opts: NodeOptions) -> None:
    """Entry point of a decode node process."""
    _node("decode", conn, opts)


class _Loop:
    role = ""

    def __init__(self, manager: Any, conn: Connection, opts: NodeOptions, buffers: DemoBuffers) -> None:
        self.m = manager
        self.buffers = buffers
        self.page_size: int = manager.regions.layout.model.page_size
        self.conn = conn
        self.opts = opts
        self.queue: list[RoomSpec] = []
        self.live: dict[int, dict[str, Any]] = {}
        self.pages = PageAllocator(opts.pool_pages)
        self.slots = list(range(opts.aux_slots))
        self.stopping = False
        self.unexpected: list[str] = []  # exceptions that escaped send()/poll()
        self.abort_requested: set[int] = set()

    def run(self) -> None:
        while not (self.stopping and not self.live and not self.queue):
            while self.conn.poll(0):
                kind, arg = self.conn.recv()
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
            self.admit()
            for room_id in list(self.live):
                try:
                    self.advance(room_id)
                except Exception as exc:  # must never happen: send()/poll() raise no transport errors
                    self.unexpected.append(f"room {room_id}: {type(exc).__name__}: {exc}")
                    self.finish(room_id, None)
            time.sleep(0.001)

    def admit(self) -> None:
        while self.queue and len(self.live) < self.opts.concurrency and self.slots:
            spec = self.queue[0]
            pages = self.pages.alloc(spec.pages)
            if pages is None:
                return
            self.queue.pop(0)
            slot = self.slots.pop()
            try:
                handle = self.create(spec)
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

    def create(self, spec: RoomSpec) -> Any:
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
        result = _result(handle, state, self.role, self.opts, entry["started"], verified, nbytes)
        self.pages.release(entry["pages"])
        self.slots.append(entry["slot"])
        self.conn.send(("done", result))


class PrefillLoop(_Loop):
    """A prefill scheduler: once decode's page list is in, fill pages and send chunks."""

    role = "prefill"

    def create(self, spec: RoomSpec) -> Any:
        from kvroom import KVSender

        return KVSender(self.m, self.m.bootstrap_addr, spec.room)

    def advance(self, room_id: int) -> None:
        from kvroom import KVPoll

        entry = self.live[room_id]
        handle, spec, pages = entry["handle"], entry["spec"], entry["pages"]
        state = handle.poll()
        if state in (KVPoll.Success, KVPoll.Failed):
            self.finish(room_id, None)
            return
        if state is KVPoll.Bootstrapping:
            return
        if not entry["ready"]:
            self.buffers.fill(spec.room, spec.pages, pages, entry["slot"])
            handle.init(spec.pages, aux_index=entry["slot"])
            entry["ready"] = True
        sent = entry["sent"]
        if sent < spec.pages:
            chunk = pages[sent : sent + self.opts.chunk_pages]
            last = sent + chunk.numel() >= spec.pages
            handle.send(
                chunk, state_indices=self.buffers.state_indices(pages, entry["slot"]) if last else None
            )
            entry["sent"] = sent + chunk.numel()


class DecodeLoop(_Loop):
    """A decode scheduler: send page lists, verify what arrives, free pages on Failed."""

    role = "decode"

    def create(self, spec: RoomSpec) -> Any:
        from kvroom import KVReceiver

        receiver = KVReceiver(self.m, self.opts.bootstrap_addr, spec.room)
        receiver.init()
        return receiver

    def advance(self, room_id: int) -> None:
        from kvroom import KVPoll

        entry = self.live[room_id]
        handle, spec, pages = entry["handle"], entry["spec"], entry["pages"]
        if not entry["ready"]:
            entry["ready"] = True
            self.buffers.clear_rows(pages, entry["slot"])
            handle.send_metadata(
                pages[spec.prefix_pages :],
                aux_index=entry["slot"],
                decode_prefix_len=spec.prefix_pages * self.page_size,
                state_indices=self.buffers.state_indices(pages, entry["slot"]),
            )
            return
        state = handle.poll()
        if state is KVPoll.Success:
            ok = self.buffers.verify(spec.room, spec.prefix_pages, spec.pages, pages, entry["slot"])
            self.finish(room_id, ok)
        elif state is KVPoll.Failed:
            self.finish(room_id, None)
