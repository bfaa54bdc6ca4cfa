"""The room table: every live room of one role, its stores, and the engine.

The engine executes the rule table *compiled from the parsed ``transitions``
machine* of :mod:`kvroom.fsm.spec` (:mod:`kvroom.fsm.compile`): for each
(event, state) the list of ``(guard, dest, cleanup)`` taken from
``machine.events[e].transitions``, and for each state the ``on_enter``
callbacks of ``machine.states``.  Entering a state arms its deadline
(:mod:`kvroom.fsm.deadlines`); entering Failed empties every registered store
(:class:`~kvroom.fsm.stores.StoreSet`) of that room.  A transition is
one list index, the guards, an attribute write and the hooks, all under the
room's own lock; nothing in it is O(live rooms).

Time is always passed in (``now``); the table reads no clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvroom.errors import (
    BackendError,
    DeadlineExceededError,
    DuplicateRoomError,
    KVRoomError,
    PeerLostError,
    RemoteFailureError,
    RoomAbortedError,
    RoomStateError,
)
from kvroom.fsm.compile import COMPILED, CompiledRule, compile_machine
from kvroom.fsm.deadlines import DeadlineHeap, Deadlines
from kvroom.fsm.observer import CleanupRecord, CreatedRecord, IgnoredRecord, Observer, TransitionRecord
from kvroom.fsm.room import Room
from kvroom.fsm.spec import ORIGIN, Event, KVPoll, Origin, Role
from kvroom.fsm.stores import KeyedStore, RoomStore, StoreSet

__all__ = ["Deadlines", "RoomTable", "CompiledRule", "compile_machine", "STANDARD_STORES", "STAGING_STORES"]

STANDARD_STORES = (
    "request_status",
    "transfer_infos",
    "decode_prefix_lens",
    "failure_records",
    "exceptions",
)
STAGING_STORES = ("prefetched_rooms", "prefetch_requested")


_DEFAULT_ERRORS: dict[Event, type[KVRoomError]] = {
    Event.ABORT: RoomAbortedError,
    Event.REMOTE_ABORT: RemoteFailureError,
    Event.TRANSPORT_ERROR: BackendError,
    Event.PEER_LOST: PeerLostError,
    Event.TIMEOUT: DeadlineExceededError,
}


class RoomTable(StoreSet):
    """All rooms of one role in one process, their stores, and their deadlines.

    Thread-safe: each transition and its cleanup runs under the room's lock;
    different rooms never share a lock on the transition path.
    """

    def __init__(
        self,
        role: Role,
        *,
        deadlines: Deadlines | None = None,
        observer: Observer | None = None,
        staging: bool | KeyedStore[Any] = False,
    ) -> None:
        self.role = role
        self.deadlines = deadlines or Deadlines()
        # None when nobody listens: no record is even built on the hot path
        self._observer: Observer | None = observer
        # observers written before creation was an event may lack on_create
        self._on_create: Callable[[CreatedRecord], None] | None = getattr(observer, "on_create", None)
        self._rules, self._enter = COMPILED[role]
        self._state_deadline = [self.deadlines.for_state(s) for s in KVPoll]
        self._rooms: dict[int, Room] = {}
        StoreSet.__init__(self)
        self.transfer_infos: RoomStore[Any] = self.register_store(RoomStore("transfer_infos"))
        self.decode_prefix_lens: RoomStore[int] = self.register_store(RoomStore("decode_prefix_lens"))
        self.failure_records: RoomStore[str] = self.register_store(RoomStore("failure_records"))
        self.exceptions: RoomStore[BaseException] = self.register_store(RoomStore("exceptions"))
        # staging: True, or the prefetch_requested store to use (one that frees ring space)
        self.staging = staging is not False
        self.prefetched_rooms: RoomStore[Any] | None = None
        self.prefetch_requested: KeyedStore[Any] | None = None
        if self.staging:
            self.prefetched_rooms = self.register_store(RoomStore("prefetched_rooms"))
            requested = staging if isinstance(staging, KeyedStore) else KeyedStore("prefetch_requested")
            self.prefetch_requested = self.register_store(requested)
        self._due = DeadlineHeap()

    # -- stores (registered through StoreSet) --------------------------------------

    def footprint(self, room_id: int) -> frozenset[str]:
        """Names of the stores that still hold state for ``room_id`` (empty when clean)."""
        held = {s.name for s in self._stores if s.holds(room_id)}
        if room_id in self._rooms:
            held.add("request_status")
        return frozenset(held)

    # -- rooms ----------------------------------------------------------------

    def create(
        self, room_id: int, now: float, *, peer: str | None = None, peers: tuple[str, ...] = ()
    ) -> Room:
        """Create a room in Bootstrapping; a live duplicate id raises, untouched."""
        if not isinstance(room_id, int) or isinstance(room_id, bool):
            raise TypeError(f"room id must be an int, got {type(room_id).__name__}")
        room = Room(room_id, self.role, self, now, (peer,) if peer is not None else peers)
        with room.lock:  # reported before any transition another thread may fire on it
            existing = self._rooms.setdefault(room_id, room)
            if existing is not room:
                raise DuplicateRoomError(
                    f"room {room_id} ({self.role.value}) already exists in state {existing.state.name}"
                )
            if self._on_create is not None:
                self._on_create(CreatedRecord(room_id, self.role, room.peer, now))
        self._arm_deadline(room, KVPoll.Bootstrapping, now)
        return room

    def get(self, room_id: int) -> Room | None:
        """The live room with this id, or None (never created, failed, or cleared)."""
        return self._rooms.get(room_id)

    def __len__(self) -> int:
        return len(self._rooms)

    def live_rooms(self) -> list[Room]:
        """A snapshot list of the live rooms."""
        return list(self._rooms.values())

    def snapshot(self) -> dict[str, int]:
        """Live rooms per state name, for operators."""
        counts = {s.name: 0 for s in KVPoll}
        for room in list(self._rooms.values()):
            counts[room.state.name] += 1
        return counts

    # -- the engine -----------------------------------------------------------

    def fire(
        self,
        room: Room,
        event: Event,
        now: float,
        *,
        error: BaseException | None = None,
        reason: str | None = None,
        infos: int = 0,
        chunks: int = 0,
        aux: bool = False,
    ) -> bool:
        """Apply ``event`` to ``room``; True when a transition was taken.

        ``infos``, ``chunks`` and ``aux`` advance the room's progress counters
        (read by the guards) atomically with the event, and only while the room
        is live.  An API event with no rule raises :class:`RoomStateError`
        (except in Failed, which absorbs everything); any other unmatched event
        is ignored and reported.
        """
        with room.lock:
            if (infos or chunks or aux) and room.live:
                room.infos_got += infos
                room.chunks_done += chunks
                room.aux_done = room.aux_done or aux
            return self._fire_locked(room, event, now, error, reason)

    def fire_id(self, room_id: int, event: Event, now: float, **kw: Any) -> bool:
        """Like :meth:`fire` for a room known only by id; unknown ids are ignored."""
        room = self._rooms.get(room_id)
        if room is None:
            if self._observer is not None:
                self._observer.on_ignored(IgnoredRecord(room_id, self.role, None, event, now))
            return False
        return self.fire(room, event, now, **kw)

    def _fire_locked(
        self, room: Room, event: Event, now: float, error: BaseException | None, reason: str | None
    ) -> bool:
        src = room.state
        rules = self._rules[event][src]
        if rules is None:
            if ORIGIN[event] is Origin.API and src is not KVPoll.Failed:
                raise RoomStateError(room.id, self.role.value, src.name, event.value)
            if self._observer is not None:
                self._observer.on_ignored(IgnoredRecord(room.id, self.role, src, event, now))
            return False
        for rule in rules:
            if rule.guard is None or rule.guard(room):
                break
        else:
            return False
        dest = rule.dest
        room.last = now
        observer = self._observer
        if dest is None:
            if observer is not None:
                observer.on_transition(
                    TransitionRecord(room.id, self.role, room.peer, src, src, event, reason, now)
                )
            for hook in rule.after:
                hook(room)
            return True
        if dest is KVPoll.Failed:
            room.error = self._resolve_failure(room, event, error, reason)
            if reason is None:
                reason = str(room.error)
        room.state = dest
        room.since = now
        self._arm_deadline(room, dest, now)
        if observer is not None:
            observer.on_transition(
                TransitionRecord(room.id, self.role, room.peer, src, dest, event, reason, now)
            )
        for hook in self._enter[dest]:
            hook(room)
        for hook in rule.after:
            hook(room)
        return True

    def _resolve_failure(
        self, room: Room, event: Event, error: BaseException | None, reason: str | None
    ) -> BaseException:
        if error is not None:
            return error
        recorded = self.exceptions.get(room.id)
        if recorded is not None:
            return recorded
        record = self.failure_records.get(room.id)
        if record is not None:
            return RuntimeError(record)
        cls = _DEFAULT_ERRORS.get(event, KVRoomError)
        return cls(reason or f"room {room.id} ({self.role.value}) failed: {event.value}")

    def cleanup(self, room: Room) -> None:
        """Remove ``room`` from every store and the registry; idempotent.

        Runs as the ``on_enter`` hook of Failed and after ``clear`` of a
        successful room, with the room's lock held.  Touches no other room.
        """
        if not room.live:
            return
        room.live = False
        room.deadline = None
        room_id = room.id
        held = [s.name for s in self._stores if s.discard_room(room_id)]
        if self._rooms.get(room.id) is room:
            del self._rooms[room.id]
            held.insert(0, "request_status")
        if self._observer is not None:
            self._observer.on_cleanup(CleanupRecord(room.id, self.role, room.state, tuple(held), room.last))

    # -- deadlines --------------------------------------------------------------

    def _arm_deadline(self, room: Room, state: KVPoll, now: float) -> None:
        seconds = self._state_deadline[state]
        if seconds is None:
            room.deadline = None
            return
        room.deadline = due = now + seconds
        self._due.push(due, room, state)

    def next_deadline(self) -> float | None:
        """The earliest armed deadline (possibly stale), for sleeping until it."""
        return self._due.earliest()

    def take_due(self, now: float) -> list[tuple[Room, KVPoll, str]]:
        """Pop the rooms whose current state's deadline is at or before ``now``.

        Returns (room, state, reason) without firing anything, for callers that
        must confirm something before failing a room (decode waits until no
        write can still land).  Stale entries (the room moved on) are dropped.
        """
        out = []
        for deadline, room, state in self._due.pop_due(now):
            if room.live and room.state is state and room.deadline == deadline:
                seconds = self._state_deadline[state]
                reason = (
                    f"room {room.id} ({self.role.value}): {state.name} deadline of {seconds:g} s exceeded"
                )
                out.append((room, state, reason))
        return out

    def fail_if_in(self, room: Room, state: KVPoll, event: Event, now: float, reason: str) -> bool:
        """Fire a failing ``event`` only if ``room`` is still in ``state``."""
        with room.lock:
            if not room.live or room.state is not state:
                return False
            return self._fire_locked(room, event, now, None, reason)

    def expire(self, now: float) -> list[int]:
        """Fail every room whose current state's deadline is at or before ``now``."""
        return [
            room.id
            for room, state, reason in self.take_due(now)
            if self.fail_if_in(room, state, Event.TIMEOUT, now, reason)
        ]

    # -- failures -------------------------------------------------------------

    def record_failure(self, room: Room, reason: str, exc: BaseException | None = None) -> None:
        """Record why a room is failing (consulted when it enters Failed)."""
        self.failure_records.put(room, reason)
        if exc is not None:
            self.exceptions.put(room, exc)

    @staticmethod
    def failure_exception(room: Room) -> BaseException:
        """The latched failure of a Failed room (its stores are already clean)."""
        if room.state is not KVPoll.Failed or room.error is None:
            raise RoomStateError(
                room.id, room.role.value, room.state.name, "failure_exception", "room has not failed"
            )
        return room.error
