"""The worker side of the kvroom connector: one KVManager, a sender or receiver per request.

Each step the worker takes the scheduler's jobs (open a room, abort a
receive) and polls every open room; a room reports once terminal:

* prefill: Success or Failed -> ``finished_sending`` (vLLM frees the blocks);
  a room opened only to be failed (the request ended without KV) reports
  nothing, since no blocks were held for it;
* decode: Success -> ``finished_recving``; Failed -> ``finished_recving`` and
  ``failed_recving`` and its blocks in :meth:`load_errors`, in the same step,
  unless the scheduler itself abandoned the request.  kvroom turns a decode
  room Failed only once no WRITE for it can still land, so vLLM may reuse or
  recompute into those blocks at once.

Prefill sends a room's blocks as one chunk the moment decode's page list
arrives (kvroom's WaitingForInput): the push runs on kvroom's own worker
thread, from the room's transition, not at the engine's next step (an engine
step can be a whole forward pass of other requests); vLLM holds the blocks
meanwhile.  :meth:`RoomWorker.results` sends too, for a room whose page list
came before it was watched; a room is sent once either way.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from kvroom import (
    DuplicateRoomError,
    KVManager,
    KVPoll,
    KVPool,
    KVReceiver,
    KVRoomError,
    KVSender,
    ManagerConfig,
)
from kvroom.fsm import TransitionRecord
from kvroom.integrations.vllm.metadata import KVRoomHandshake, KVRoomMetadata, RecvJob, SendJob
from kvroom.integrations.vllm.stats import new_data
from kvroom.observe.metrics import room_bytes

__all__ = ["RoomWorker", "Results"]

_log = structlog.get_logger("kvroom.vllm")


@dataclass
class Results:
    """One step's terminal rooms, in vLLM's terms."""

    finished_sending: set[str] = field(default_factory=set)
    finished_recving: set[str] = field(default_factory=set)
    failed_recving: set[str] = field(default_factory=set)


@dataclass
class _Open:
    """A request's open room: its handle, blocks and when it opened."""

    req_id: str
    handle: KVSender | KVReceiver | _Unopened
    pages: tuple[int, ...]
    opened: float
    sent: bool = False
    cancelled: bool = False
    room_id: int | None = None  # prefill: the room it pushes into


class RoomWorker:
    """kvroom's state in one vLLM worker (rank ``tp_rank`` of ``tp_size``)."""

    def __init__(
        self,
        producer: bool,
        config: ManagerConfig,
        *,
        bootstrap_port: int = 0,
        tp_rank: int = 0,
        audit: bool = True,
    ) -> None:
        self.producer = producer
        self.config = config
        self.bootstrap_port = bootstrap_port
        self.tp_rank = tp_rank
        self.audit = audit
        self.manager: KVManager | None = None
        self.rooms: dict[str, _Open] = {}
        self.errors: set[int] = set()  # decode blocks whose load failed, reported next
        self.stats = new_data()
        self._taken: KVRoomMetadata | None = None  # the last metadata taken (held: ids get reused)
        self._push_lock = threading.Lock()  # a room is sent once: by its transition or by results()
        self._by_room: dict[int, _Open] = {}  # prefill: rooms to push when their page list arrives

    def register(self, pool: KVPool) -> None:
        """Start kvroom's manager on the registered pool (once)."""
        if self.manager is not None:
            raise RuntimeError("kvroom KV caches are already registered")
        port = self.bootstrap_port + self.tp_rank if self.bootstrap_port else 0
        role = "prefill" if self.producer else "decode"
        self.manager = KVManager(role, pool, bootstrap_port=port, config=self.config, audit=self.audit)
        if self.producer:  # see every transition first-hand; the manager's own observer still gets it
            self.manager.observer = _PushOnReady(self, self.manager.observer)

    def handshake(self) -> KVRoomHandshake | None:
        """This worker's bootstrap address, for the scheduler to hand to routers."""
        m = self.manager
        return None if m is None else KVRoomHandshake(m.bootstrap_addr, m.agent_name, self.tp_rank)

    # -- jobs -------------------------------------------------------------------

    def take(self, meta: KVRoomMetadata) -> None:
        """Carry out one step's jobs (each metadata object once)."""
        if self.manager is None or meta is self._taken:
            return
        self._taken = meta
        for send in meta.sends:
            self._send(send)
        for recv in meta.recvs:
            self._recv(recv)
        for req_id in meta.cancels:
            room = self.rooms.get(req_id)
            if room is not None and not room.cancelled:
                room.cancelled = True
                room.handle.abort("request aborted by the vLLM scheduler")

    def _send(self, job: SendJob) -> None:
        assert self.manager is not None
        try:
            sender = KVSender(self.manager, None, job.room, fingerprint=job.fingerprint)
        except KVRoomError as exc:  # e.g. a duplicate live room id: this request cannot send
            if job.pages:  # report it Failed next, so vLLM frees the blocks
                self.rooms[job.req_id] = _Open(job.req_id, _Unopened(exc), job.pages, time.monotonic())
            else:
                self._count_failure(type(exc).__name__)
            return
        if not job.pages:
            sender.abort("the prefill request ended without KV to send")
            self._count_failure("RoomAbortedError")
            return
        room = _Open(job.req_id, sender, job.pages, time.monotonic(), room_id=job.room)
        self.rooms[job.req_id] = room
        with self._push_lock:
            self._by_room[job.room] = room
        if sender.poll() is KVPoll.WaitingForInput:  # the page list was in before we watched
            self._push(room)

    def _recv(self, job: RecvJob) -> None:
        assert self.manager is not None
        if not job.pages:
            self._forgo(job)
            return
        try:
            receiver = KVReceiver(self.manager, list(job.bootstrap_addr), job.room)
            receiver.init()
            receiver.send_metadata(list(job.pages), None, job.prefix_len, fingerprint=job.fingerprint)
        except (KVRoomError, ValueError, TypeError) as exc:  # reported as a failed receive next
            self.rooms[job.req_id] = _Open(job.req_id, _Unopened(exc), job.pages, time.monotonic())
            if isinstance(exc, DuplicateRoomError):
                self._forgo_held(job, f"request {job.req_id} cannot take room {job.room}: {exc}")
            return
        self.rooms[job.req_id] = _Open(job.req_id, receiver, job.pages, time.monotonic())

    def _forgo(self, job: RecvJob) -> None:
        """Decode: the request ended before its receive opened; abort the room at prefill."""
        assert self.manager is not None
        reason = "the decode request ended before its KV was received"
        try:
            receiver = KVReceiver(self.manager, list(job.bootstrap_addr), job.room)
        except DuplicateRoomError:
            self._forgo_held(job, reason)
            return
        except (KVRoomError, ValueError, TypeError):
            return
        receiver.init()
        receiver.abort(reason)
        self._count_failure("RoomAbortedError")

    def _forgo_held(self, job: RecvJob, reason: str) -> None:
        """Another request of ours holds the room id: prefill fails the room of this request only.

        Aborting the id would fail the request that holds it; prefill's room for this
        request (told apart by its fingerprint) would otherwise wait for its deadline.
        """
        assert self.manager is not None
        if job.fingerprint is None:
            return  # a prompt without token ids: nothing tells its room from the holder's
        try:
            self.manager.forgo(job.room, list(job.bootstrap_addr), job.fingerprint, reason)
        except (KVRoomError, ValueError, TypeError) as exc:
            _log.warning("kvroom.vllm.forgo_failed", room=job.room, req_id=job.req_id, reason=str(exc))

    # -- progress ---------------------------------------------------------------

    def results(self) -> Results:
        """Drive every open room one step; report those that ended."""
        out = Results()
        for req_id, room in list(self.rooms.items()):
            state = room.handle.poll()
            if state is KVPoll.WaitingForInput and self.producer and not room.sent:
                self._push(room)
                state = room.handle.poll()
            if state not in (KVPoll.Success, KVPoll.Failed):
                continue
            del self.rooms[req_id]
            if room.room_id is not None:
                with self._push_lock:
                    self._by_room.pop(room.room_id, None)
            self._ended(room, state)
            if self.producer:
                out.finished_sending.add(req_id)
                continue
            out.finished_recving.add(req_id)
            if state is KVPoll.Failed and not room.cancelled:
                out.failed_recving.add(req_id)
                self.errors.update(room.pages)
        return out

    def _push(self, room: _Open) -> None:
        """Send a prefill room's blocks (any thread; once)."""
        with self._push_lock:
            if room.sent:
                return
            room.sent = True
        sender = room.handle
        assert isinstance(sender, KVSender)
        try:
            sender.init(len(room.pages))
            sender.send(list(room.pages))
        except (KVRoomError, ValueError, TypeError) as exc:  # e.g. the room failed meanwhile
            sender.abort(f"could not send the request's blocks: {exc}")

    def on_ready(self, room_id: int) -> None:
        """A prefill room's page list arrived (kvroom's worker thread, room lock held): push soon."""
        with self._push_lock:
            room = self._by_room.get(room_id)
        if room is not None and not room.sent and self.manager is not None:
            self.manager.enqueue(lambda: self._push(room))  # on kvroom's thread, once the lock is free

    def _ended(self, room: _Open, state: KVPoll) -> None:
        ended = self.stats["ended"]
        ended[state.name] = ended.get(state.name, 0) + 1
        if state is KVPoll.Success:
            if self.manager is not None and not isinstance(room.handle, _Unopened):
                # what moved: the blocks past decode's prefix hit (and aux rows), not the prompt's
                self.stats["bytes"] += room_bytes(self.manager, room.handle.bootstrap_room)
            room.handle.clear()
            self.stats["latency_s"].append(time.monotonic() - room.opened)
            return
        cause, reason = "unknown", ""
        try:
            room.handle.failure_exception()
        except BaseException as exc:
            cause, reason = type(exc).__name__, str(exc)
        self._count_failure(cause)
        _log.info("kvroom.vllm.room_failed", req_id=room.req_id, cause=cause, reason=reason[:500])

    def _count_failure(self, cause: str) -> None:
        failures = self.stats["failures"]
        failures[cause] = failures.get(cause, 0) + 1

    def load_errors(self) -> set[int]:
        """Decode blocks of failed receives since the last call."""
        errors, self.errors = self.errors, set()
        return errors

    def take_stats(self) -> dict[str, Any]:
        """The interval's stats (rooms open now by state included); starts a new interval."""
        data, self.stats = self.stats, new_data()
        live: dict[str, int] = {}
        for room in self.rooms.values():
            name = room.handle.poll().name
            live[name] = live.get(name, 0) + 1
        data["live"] = live
        return data

    def held(self, req_id: str, room: int) -> list[str]:
        """Where this worker still holds request ``req_id`` / room ``room`` (empty when clean)."""
        found = ["rooms"] if req_id in self.rooms else []
        if self.manager is not None:
            found.extend(sorted(self.manager.footprint(room)))
        return found

    def close(self) -> None:
        """Abort open rooms and stop kvroom (idempotent)."""
        for room in self.rooms.values():
            with contextlib.suppress(Exception):
                room.handle.abort("the vLLM worker is shutting down")
        self.rooms.clear()
        with self._push_lock:
            self._by_room.clear()
        if self.manager is not None:
            self.manager.close()
            self.manager = None


class _PushOnReady:
    """The manager's observer, wrapped: a room entering WaitingForInput is pushed at once."""

    def __init__(self, worker: RoomWorker, inner: Any) -> None:
        self.worker = worker
        self.inner = inner
        for name in ("on_create", "on_cleanup", "on_ignored"):
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))

    def on_create(self, record: Any) -> None:
        """No audit observer: nothing to forward."""

    def on_cleanup(self, record: Any) -> None:
        """No audit observer: nothing to forward."""

    def on_ignored(self, record: Any) -> None:
        """No audit observer: nothing to forward."""

    def on_transition(self, record: TransitionRecord) -> None:
        """Forward, then push a room whose page list arrived."""
        if self.inner is not None:
            self.inner.on_transition(record)
        if record.dst is KVPoll.WaitingForInput:
            self.worker.on_ready(record.room)


class _Unopened:
    """The handle of a room that could not be opened: Failed with that error."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def poll(self) -> KVPoll:
        return KVPoll.Failed

    def failure_exception(self) -> BaseException:
        raise self.error

    def abort(self, reason: str = "") -> None:
        return None

    def clear(self) -> None:
        return None
