"""Stateful property test: random interleavings of events over many rooms."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvroom.errors import DuplicateRoomError, RoomStateError
from kvroom.fsm import TERMINAL, Deadlines, Event, KVPoll, Role, RoomTable
from kvroom.fsm.room import Room

ORDER = {KVPoll.Bootstrapping: 1, KVPoll.WaitingForInput: 2, KVPoll.Transferring: 3, KVPoll.Success: 4}


class RoomTableMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table: RoomTable
        self.rooms: dict[int, Room] = {}
        self.terminal_seen: dict[int, KVPoll] = {}
        self.cleared: set[int] = set()
        self.now = 0.0

    @initialize(role=st.sampled_from(list(Role)), staging=st.booleans())
    def setup(self, role: Role, staging: bool) -> None:
        self.table = RoomTable(role, staging=staging, deadlines=Deadlines(1.0, 2.0, 1.5))

    def snapshot(self) -> dict[int, tuple[KVPoll, frozenset[str]]]:
        return {rid: (r.state, self.table.footprint(rid)) for rid, r in self.rooms.items()}

    @rule(room_id=st.integers(0, 30))
    def create(self, room_id: int) -> None:
        before = self.snapshot()
        if self.table.get(room_id) is not None:
            try:
                self.table.create(room_id, self.now)
            except DuplicateRoomError:
                assert self.snapshot() == before
                return
            raise AssertionError("duplicate accepted")
        if room_id in self.rooms:
            return  # keep one Room object per id in this model
        room = self.table.create(room_id, self.now)
        room.chunks_needed = 2
        self.rooms[room_id] = room

    @precondition(lambda self: self.rooms)
    @rule(data=st.data(), event=st.sampled_from(list(Event)), bump=st.booleans())
    def fire(self, data: st.DataObject, event: Event, bump: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.rooms)))
        room = self.rooms[rid]
        before = self.snapshot()
        state = room.state
        try:
            self.table.fire(room, event, self.now, infos=int(bump), chunks=int(bump), aux=bump)
        except RoomStateError:
            assert room.state is state
        after = self.snapshot()
        for other, value in before.items():
            if other != rid:
                assert after[other] == value, f"room {other} changed by an event for room {rid}"

    @precondition(lambda self: self.rooms)
    @rule(data=st.data(), value=st.integers())
    def late_write(self, data: st.DataObject, value: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.rooms)))
        room = self.rooms[rid]
        stored = self.table.transfer_infos.put(room, value)
        assert stored == room.live

    @rule(dt=st.floats(0.0, 1.0))
    def tick(self, dt: float) -> None:
        self.now += dt
        for rid in self.table.expire(self.now):
            assert self.rooms[rid].state is KVPoll.Failed

    @invariant()
    def rooms_behave(self) -> None:
        for rid, room in self.rooms.items():
            if rid in self.terminal_seen:
                assert room.state is self.terminal_seen[rid], "terminal state changed"
            elif room.state in TERMINAL:
                self.terminal_seen[rid] = room.state
            if not room.live:
                self.cleared.add(rid)
            if rid in self.cleared:
                assert not room.live and self.table.footprint(rid) == frozenset(), "resurrected"
                assert room.state in TERMINAL
            if room.state is KVPoll.Failed:
                assert self.table.footprint(rid) == frozenset()

    @invariant()
    def progress_is_monotone(self) -> None:
        prev = getattr(self, "_prev", {})
        for rid, room in self.rooms.items():
            if rid in prev and room.state is not KVPoll.Failed and prev[rid] is not KVPoll.Failed:
                assert ORDER[room.state] >= ORDER[prev[rid]]
        self._prev = {rid: r.state for rid, r in self.rooms.items()}


RoomTableMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestRoomTable = RoomTableMachine.TestCase
