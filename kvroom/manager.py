"""``KVManager``: one per process and role; joins the room table and the transport.

One worker thread owns the NIXL agent and every ZMQ socket (the agent runs
without a progress thread and with no thread-safety, so nothing else may touch
it).  Scheduler threads talk to the worker through a command queue and read
room state directly; state changes go through the room table, under each
room's lock.

A NIXL fault fails its room (or every room of a lost peer) and is returned by
``failure_exception()``.  Anything else raised in the worker is a bug: it fails
every live room with that error and is re-raised by the next API call.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import structlog
import zmq

from kvroom.config import ManagerConfig
from kvroom.errors import KVRoomError
from kvroom.fingerprint import check_fingerprint
from kvroom.fsm import (
    CleanupRecord,
    CreatedRecord,
    Event,
    IgnoredRecord,
    Observer,
    Role,
    RoomTable,
    TransitionRecord,
)
from kvroom.fsm.room import Room
from kvroom.node.host import StallWatch
from kvroom.node.wake import WakeQueue
from kvroom.observe.audit import AuditObserver, BackgroundObserver
from kvroom.planning import RankRegions, from_kv_pool
from kvroom.transport.auth import require_auth
from kvroom.transport.control import parse_addresses
from kvroom.transport.layout import KVPool
from kvroom.transport.nixl import NixlAgent, unique_agent_name
from kvroom.transport.regions import Region
from kvroom.transport.staging import StagingRing, StagingStore

if TYPE_CHECKING:
    from kvroom.observe.metrics import KVMetrics, MetricsObserver

__all__ = ["KVManager", "StallWatch"]

Command = Callable[[], None]
COMMAND_BUDGET = 0.02
"""Seconds of queued commands (posting chunks) the worker runs per loop turn."""


class KVManager:
    """Owns the NIXL agent, the control plane and the room table of one role.

    ``role``: ``"prefill"``/``Role.SENDER`` or ``"decode"``/``Role.RECEIVER``.
    ``pool``: what this rank registers and serves: a
    :class:`~kvroom.planning.RankRegions` (its :class:`~kvroom.planning.RankLayout`
    bound to raw regions, as engines hand them), or a torch
    :class:`~kvroom.transport.layout.KVPool`, the convenience over the same
    thing (:func:`~kvroom.planning.from_kv_pool`; only a ``KVPool`` has a
    staging ring).  Every region is registered with NIXL.  Prefill listens on
    ``bootstrap_port`` (0 picks a free one; see :attr:`bootstrap_addr`).
    ``observer`` receives every transition; by default they go to structlog
    as audit events, rendered on a background writer thread
    (:class:`~kvroom.observe.audit.BackgroundObserver`; ``audit=False`` turns them off).
    ``metrics``: a :class:`~kvroom.observe.metrics.KVMetrics` to report to (Prometheus; off by default).
    """

    def __init__(
        self,
        role: Role | str,
        pool: KVPool | RankRegions,
        *,
        bootstrap_port: int = 0,
        config: ManagerConfig | None = None,
        observer: Observer | None = None,
        audit: bool = True,
        logger: Any = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: KVMetrics | None = None,
    ) -> None:
        self.role = _parse_role(role)
        if isinstance(pool, KVPool):
            self.tensors: KVPool | None = pool
            self.regions = from_kv_pool(pool)
        elif isinstance(pool, RankRegions):
            self.tensors, self.regions = None, pool
        else:
            raise TypeError(f"pool must be a KVPool or a RankRegions, got {type(pool).__name__}")
        self.config = config or ManagerConfig()
        self.pool = pool
        self.clock = clock
        self.agent_name = unique_agent_name(self.role.value)
        self.log = (logger or structlog.get_logger("kvroom")).bind(
            role=self.role.value, agent=self.agent_name
        )
        self._own_observer: BackgroundObserver | None = None
        if observer is None and audit:  # rendered on a writer thread, not the scheduler's
            observer = self._own_observer = BackgroundObserver(
                AuditObserver(logger, role=self.role.value, process=self.agent_name)
            )
        self.observer = observer
        self._metrics: MetricsObserver | None = metrics.observer(self) if metrics is not None else None
        staging: bool | StagingStore = False
        if self.role is Role.RECEIVER:
            units = self.tensors.staging_units if self.tensors is not None else 0
            staging = StagingStore("prefetch_requested", StagingRing(units))
        self.table = RoomTable(
            self.role, deadlines=self.config.deadlines, observer=_Forward(self), staging=staging
        )
        self._commands: WakeQueue[Command] = WakeQueue()  # the scheduler's calls, for the worker
        self._stopping = threading.Event()
        self.stall = StallWatch(self.config.heartbeat_interval, clock())
        self._fatal: BaseException | None = None
        if self.role is Role.SENDER:
            require_auth(self.config.host, self.config.keys, self.config.allow_unauthenticated, self.log)
        self.zmq_context: zmq.Context[Any] = zmq.Context()  # the sides open their sockets on it
        self.agent = NixlAgent(self.agent_name, self._registered_regions(), self.config.backends)
        try:
            self.side = self._make_side(bootstrap_port)
        except BaseException:
            self.agent.close()
            self.zmq_context.term()
            raise
        self.bootstrap_addr: str = getattr(self.side, "address", "")
        # the one thread that owns the NIXL agent and the sockets
        self.worker = threading.Thread(target=self._run, name=f"kvroom-{self.role.value}", daemon=True)
        self.worker.start()

    def _registered_regions(self) -> list[Region]:
        regions = list(self.regions.pool)
        tensors = self.tensors
        if tensors is not None and tensors.staging_units:
            size = int(tensors.staging.numel())
            regions.append(
                Region("staging", int(tensors.staging.data_ptr()), size, size, tensors.mem, tensors.device)
            )
        return regions

    def _make_side(self, port: int) -> Any:
        if self.role is Role.SENDER:
            from kvroom.node.prefill import PrefillSide

            return PrefillSide(self, port)
        from kvroom.node.decode import DecodeSide

        return DecodeSide(self)

    # -- API used by senders and receivers --------------------------------------

    def check_alive(self) -> None:
        """Raise if the worker died of a bug (never for transport faults)."""
        if self._fatal is not None:
            raise RuntimeError(f"kvroom {self.role.value} worker crashed: {self._fatal!r}") from self._fatal
        if self._stopping.is_set():
            raise KVRoomError(f"kvroom {self.role.value} manager is closed")

    def submit(self, command: Command) -> None:
        """Run ``command`` on the worker thread, soon (raises if the worker died)."""
        self.check_alive()
        self.enqueue(command)

    def enqueue(self, command: Command) -> None:
        """Queue ``command`` for the worker without checking it is alive (internal hooks)."""
        self._commands.put(command)

    def create_room(self, room_id: int, peers: tuple[str, ...] = ()) -> Room:
        """Create a room in Bootstrapping (DuplicateRoomError for a live id)."""
        self.check_alive()
        return self.table.create(room_id, self.clock(), peers=peers)

    def prefetch_staging(self, room_id: int, bootstrap_addr: str | Sequence[str], num_pages: int) -> bool:
        """Decode: reserve staging-ring space for an upcoming room (it need not exist yet).

        ``bootstrap_addr`` and ``num_pages`` are what the room's receiver will
        use (``num_pages`` after any prefix).  Returns False when the ring has
        no room now (the receiver reserves, or waits, when it sends its page
        list); True when reserved or when this room needs no staging.  The
        reservation is freed when the room ends, however it ends, or after
        ``pending_ttl`` if the room is never created.
        """
        if self.role is not Role.RECEIVER:
            raise ValueError("prefetch_staging is a decode-side call")
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 0:
            raise ValueError(f"num_pages must be a non-negative int, got {num_pages!r}")
        self.check_alive()
        return bool(self.side.prefetch(room_id, parse_addresses(bootstrap_addr), num_pages))

    def forgo(self, room_id: int, bootstrap_addr: str | Sequence[str], fingerprint: str, reason: str) -> None:
        """Decode: the request ``fingerprint`` will never receive room ``room_id``; tell prefill.

        For a request that cannot open a receiver because another request here holds
        the id (:class:`~kvroom.DuplicateRoomError`): aborting a receiver would fail
        the room of the request that holds it.  Prefill fails its room for
        ``fingerprint``'s request only (:func:`kvroom.request_fingerprint`), now or as
        it opens within ``pending_ttl``, instead of at its Bootstrapping deadline; a
        room of that id for any other request is untouched.  Nothing is answered;
        returns at once (the message leaves from the worker).
        """
        if self.role is not Role.RECEIVER:
            raise ValueError("forgo is a decode-side call")
        if isinstance(room_id, bool) or not isinstance(room_id, int) or not 0 <= room_id < 2**64:
            raise ValueError(f"room_id must be an int in [0, 2**64), got {room_id!r}")
        if fingerprint is None:
            raise ValueError("forgo needs the request's fingerprint (kvroom.request_fingerprint)")
        check_fingerprint(fingerprint)
        if not isinstance(reason, str):
            raise TypeError(f"reason must be a str, got {type(reason).__name__}")
        addresses = parse_addresses(bootstrap_addr)
        side = self.side
        self.submit(lambda: side.forgo(room_id, addresses, fingerprint, reason))

    def fire(self, room: Room, event: Event, **kw: Any) -> bool:
        """Fire an event at the current time."""
        return self.table.fire(room, event, self.clock(), **kw)

    def footprint(self, room_id: int) -> frozenset[str]:
        """Stores still holding state for ``room_id`` (empty after cleanup)."""
        return self.table.footprint(room_id)

    def snapshot(self) -> dict[str, Any]:
        """Live rooms per state and peer counts, for operators."""
        return {"role": self.role.value, "rooms": self.table.snapshot(), **self.side.snapshot()}

    # -- the worker -------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._commands.fd, zmq.POLLIN)
        self.stall.last = self.clock()  # the loop starts now: set-up time is no stall
        try:
            while not self._stopping.is_set():
                self.side.register(poller)
                ready = self._wait(poller)
                if self._commands.fd in ready:
                    self._commands.wakeups()
                self._run_commands()
                now = self.clock()
                if self.stall.tick(now):
                    self.log.warning("kvroom.worker_stalled", seconds=round(self.stall.pause, 3))
                self.side.step(ready, now)
                self.side.expire(now)
        except BaseException as exc:  # a bug: fail every room with it, re-raise on next API call
            self._fatal = exc
            self.log.exception("kvroom.worker_crashed")
            now = self.clock()
            for room in self.table.live_rooms():
                self.table.fire(
                    room, Event.TRANSPORT_ERROR, now, error=exc, reason=f"worker crashed: {exc!r}"
                )
        finally:
            self.side.close()

    def _run_commands(self) -> None:
        """Run queued commands for at most ``COMMAND_BUDGET`` seconds.

        A burst of ``send()`` calls may queue seconds of WRITEs (their copies run
        inline on host memory); the rest waits for the next loop turn, so messages,
        heartbeats and deadlines are served between, and the loop's clock never
        mistakes the burst for a stall.
        """
        commands = self._commands.items
        if not commands:
            return
        until = time.monotonic() + COMMAND_BUDGET
        while commands:
            commands.popleft()()
            if time.monotonic() >= until:
                return

    def _wait(self, poller: zmq.Poller) -> dict[Any, int]:
        """Until a socket is ready, or for one tick: 5 ms idle, the side's NIXL poll tick while busy."""
        if self._commands.items:
            return dict(poller.poll(0))
        tick = self.side.tick()
        if tick is None:
            return dict(poller.poll(5))
        if tick >= 0.001:  # whole milliseconds: ZMQ's poll wakes on a message
            return dict(poller.poll(int(tick * 1000)))
        ready = dict(poller.poll(0))
        if not ready:  # ZMQ cannot wait less than 1 ms: wait on its file descriptors, then look again
            select.select(_fds(poller), [], [], tick)
            ready = dict(poller.poll(0))
        return ready

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker, close sockets and deregister memory (idempotent)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._commands.wake()
        self.worker.join(timeout)
        if self._own_observer is not None:
            self._own_observer.close()
        if self._metrics is not None:
            self._metrics.close()
        self.agent.close()
        self.zmq_context.term()
        self._commands.close()

    def __enter__(self) -> KVManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fds(poller: zmq.Poller) -> list[int]:
    """The file descriptors behind a poller's sockets: readable when a socket's events may have
    changed (ZMQ's are edge-triggered, so a wake-up only says "look", and a wait may miss one
    already taken: bound it)."""
    return [s if isinstance(s, int) else s.getsockopt(zmq.FD) for s, _ in poller.sockets]


class _Forward:
    """The table's observer: the user's observer first, then the transport side."""

    def __init__(self, manager: KVManager) -> None:
        self.m = manager

    def on_create(self, record: CreatedRecord) -> None:
        on_create = getattr(self.m.observer, "on_create", None)  # observers may predate creation events
        if on_create is not None:
            on_create(record)
        if self.m._metrics is not None:
            self.m._metrics.on_create(record)

    def on_transition(self, record: TransitionRecord) -> None:
        if self.m.observer is not None:
            self.m.observer.on_transition(record)
        if self.m._metrics is not None:
            self.m._metrics.on_transition(record)
        side = getattr(self.m, "side", None)
        if side is not None:
            side.on_transition(record)

    def on_cleanup(self, record: CleanupRecord) -> None:
        if self.m.observer is not None:
            self.m.observer.on_cleanup(record)

    def on_ignored(self, record: IgnoredRecord) -> None:
        if self.m.observer is not None:
            self.m.observer.on_ignored(record)


def _parse_role(role: Role | str) -> Role:
    if isinstance(role, Role):
        return role
    aliases = {
        "prefill": Role.SENDER,
        "sender": Role.SENDER,
        "decode": Role.RECEIVER,
        "receiver": Role.RECEIVER,
    }
    if not isinstance(role, str) or role.lower() not in aliases:
        raise ValueError(f"role must be 'prefill' or 'decode', got {role!r}")
    return aliases[role.lower()]
