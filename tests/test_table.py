"""The room table: cleanup, failure latching, deadlines, duplicates, threads."""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest

from kvroom.errors import (
    DeadlineExceededError,
    DuplicateRoomError,
    PeerLostError,
    RoomAbortedError,
    RoomStateError,
)
from kvroom.fsm import (
    STAGING_STORES,
    STANDARD_STORES,
    Deadlines,
    Event,
    KVPoll,
    RecordingObserver,
    Role,
    RoomTable,
)
from kvroom.fsm.room import Room


def fill_every_store(table: RoomTable, room: Room) -> None:
    table.transfer_infos.put(room, {"dst": [1, 2]})
    table.decode_prefix_lens.put(room, 16)
    table.failure_records.put(room, "earlier trouble")
    table.exceptions.put(room, ValueError("recorded"))
    if table.staging:
        assert table.prefetched_rooms is not None and table.prefetch_requested is not None
        table.prefetched_rooms.put(room, {"slots": [3]})
        table.prefetch_requested.put(room, (room.id, 0, "sess"), True)
        table.prefetch_requested.put(room, (room.id, 1, "sess"), True)


@pytest.mark.parametrize("staging", [True, False])
def test_field_case_failing_room_7_cleans_only_room_7(staging: bool) -> None:
    obs = RecordingObserver()
    table = RoomTable(Role.SENDER, staging=staging, observer=obs)
    r7, r8 = table.create(7, 0.0, peer="decode-a"), table.create(8, 0.0, peer="decode-a")
    fill_every_store(table, r7)
    fill_every_store(table, r8)
    everything = set(STANDARD_STORES) | (set(STAGING_STORES) if staging else set())
    assert table.footprint(7) == everything == table.footprint(8)

    err = PeerLostError("NIXL remote disconnect while writing room 7")
    table.fire(r7, Event.TRANSPORT_ERROR, 1.0, error=err)

    assert r7.state is KVPoll.Failed
    assert table.footprint(7) == frozenset()
    with pytest.raises(PeerLostError) as info:
        raise table.failure_exception(r7)
    assert info.value is err
    assert table.footprint(8) == everything and r8.state is KVPoll.Bootstrapping
    assert table.transfer_infos.get(8) == {"dst": [1, 2]}
    assert [c.room for c in obs.cleanups] == [7]
    assert set(obs.cleanups[0].stores) == everything


def test_failure_exception_precedence() -> None:
    table = RoomTable(Role.RECEIVER)
    a, b, c, d = (table.create(i, 0.0) for i in range(4))
    table.exceptions.put(a, ValueError("recorded"))
    table.failure_records.put(a, "reason")
    table.fire(a, Event.PEER_LOST, 1.0, error=PeerLostError("transport"))
    assert str(table.failure_exception(a)) == "transport"
    table.exceptions.put(b, ValueError("recorded"))
    table.failure_records.put(b, "reason")
    table.fire(b, Event.PEER_LOST, 1.0)
    assert repr(table.failure_exception(b)) == "ValueError('recorded')"
    table.failure_records.put(c, "reason")
    table.fire(c, Event.PEER_LOST, 1.0)
    assert repr(table.failure_exception(c)) == "RuntimeError('reason')"
    table.fire(d, Event.ABORT, 1.0)
    assert isinstance(table.failure_exception(d), RoomAbortedError)
    for room in (a, b, c, d):
        assert table.footprint(room.id) == frozenset()


def test_failure_exception_of_a_live_room_is_misuse() -> None:
    table = RoomTable(Role.SENDER)
    room = table.create(1, 0.0)
    with pytest.raises(RoomStateError, match="failure_exception"):
        table.failure_exception(room)


def test_duplicate_room_is_rejected_and_existing_room_untouched() -> None:
    table = RoomTable(Role.SENDER)
    room = table.create(5, 0.0)
    table.transfer_infos.put(room, "mine")
    with pytest.raises(DuplicateRoomError, match="room 5"):
        table.create(5, 1.0)
    assert table.get(5) is room and table.transfer_infos.get(5) == "mine"


def test_cleared_room_is_never_resurrected() -> None:
    obs = RecordingObserver()
    table = RoomTable(Role.RECEIVER, observer=obs)
    room = table.create(3, 0.0)
    table.fire(room, Event.ABORT, 1.0)
    assert table.transfer_infos.put(room, "late") is False
    assert table.fire_id(3, Event.CHUNK_ARRIVED, 2.0) is False
    assert table.fire(room, Event.CHUNK_ARRIVED, 2.0) is False
    assert table.footprint(3) == frozenset() and len(table) == 0
    assert [r.event for r in obs.ignored] == [Event.CHUNK_ARRIVED, Event.CHUNK_ARRIVED]
    assert obs.ignored[0].state is None


def test_clear_after_success_uses_the_same_cleanup_and_is_idempotent() -> None:
    obs = RecordingObserver()
    table = RoomTable(Role.RECEIVER, observer=obs)
    room = table.create(1, 0.0)
    table.decode_prefix_lens.put(room, 4)
    table.fire(room, Event.METADATA_SENT, 0.1)
    room.chunks_needed = 2
    table.fire(room, Event.CHUNK_ARRIVED, 0.2, chunks=1)
    assert not table.fire(room, Event.COMPLETE, 0.3)  # guard: one chunk missing
    table.fire(room, Event.CHUNK_ARRIVED, 0.4, chunks=1, aux=True)
    assert table.fire(room, Event.COMPLETE, 0.5)
    assert room.state is KVPoll.Success
    assert table.footprint(1) == {"request_status", "decode_prefix_lens"}
    table.fire(room, Event.CLEAR, 0.6)
    table.fire(room, Event.CLEAR, 0.7)
    assert table.footprint(1) == frozenset()
    assert len(obs.cleanups) == 1


def test_a_room_with_nothing_to_copy_completes_on_its_end_marker() -> None:
    table = RoomTable(Role.RECEIVER)
    room = table.create(1, 0.0)  # every page was in decode's cached prefix
    table.fire(room, Event.METADATA_SENT, 0.1)
    table.fire(room, Event.CHUNK_ARRIVED, 0.2, chunks=0)
    assert not table.fire(room, Event.COMPLETE, 0.3)  # the end has not arrived
    table.fire(room, Event.CHUNK_ARRIVED, 0.4, chunks=0, aux=True)
    assert table.fire(room, Event.COMPLETE, 0.5) and room.state is KVPoll.Success


def test_clear_of_a_live_room_is_misuse() -> None:
    table = RoomTable(Role.SENDER)
    room = table.create(1, 0.0)
    with pytest.raises(
        RoomStateError, match=r"room 1 \(sender\): event 'clear' is not allowed in state Bootstrapping"
    ):
        table.fire(room, Event.CLEAR, 0.0)


def test_deadlines_fail_overdue_rooms_only() -> None:
    table = RoomTable(Role.SENDER, deadlines=Deadlines(bootstrapping=5, waiting=None, transferring=2))
    slow, moving, fresh = table.create(1, 0.0), table.create(2, 0.0), table.create(3, 4.0)
    table.fire(moving, Event.DST_INFO, 1.0, infos=1)  # WaitingForInput: no deadline
    assert table.expire(4.9) == []
    assert table.expire(5.0) == [1]
    assert slow.state is KVPoll.Failed
    assert isinstance(table.failure_exception(slow), DeadlineExceededError)
    assert "Bootstrapping deadline of 5 s exceeded" in str(table.failure_exception(slow))
    assert moving.state is KVPoll.WaitingForInput and fresh.state is KVPoll.Bootstrapping
    table.fire(moving, Event.SEND, 6.0)
    assert table.expire(7.9) == []
    assert table.expire(8.0) == [2]
    assert table.expire(9.0) == [3]
    assert len(table) == 0


def test_deadline_values_are_validated() -> None:
    with pytest.raises(ValueError, match="transferring"):
        Deadlines(transferring=0)


def test_store_registration_and_keys() -> None:
    table = RoomTable(Role.RECEIVER, staging=True)
    with pytest.raises(ValueError, match="already registered"):
        from kvroom.fsm import RoomStore

        table.register_store(RoomStore("exceptions"))
    room = table.create(9, 0.0)
    assert table.prefetch_requested is not None
    with pytest.raises(ValueError, match="does not start with room id"):
        table.prefetch_requested.put(room, (10, 0, "s"), 1)
    with pytest.raises(TypeError):
        table.create("9", 0.0)  # type: ignore[arg-type]


def test_threads_firing_at_shared_rooms_never_lose_or_double_a_cleanup() -> None:
    obs = RecordingObserver()
    table = RoomTable(Role.RECEIVER, observer=obs, staging=True)
    rooms = [table.create(i, 0.0) for i in range(200)]
    for room in rooms:
        fill_every_store(table, room)
        room.chunks_needed = 3
    events = [
        Event.METADATA_SENT,
        Event.CHUNK_ARRIVED,
        Event.COMPLETE,
        Event.PEER_LOST,
        Event.ABORT,
        Event.TIMEOUT,
    ]
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        barrier.wait()
        try:
            for _ in range(3000):
                room = rng.choice(rooms)
                event = rng.choice(events)
                table.fire(room, event, 1.0, chunks=1 if event is Event.CHUNK_ARRIVED else 0, aux=True)
                if rng.random() < 0.2:
                    table.transfer_infos.put(room, "late write")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    cleanups = Counter(c.room for c in obs.cleanups)
    for room in rooms:
        if room.state is KVPoll.Failed:
            assert cleanups[room.id] == 1
            assert table.footprint(room.id) == frozenset()
        else:
            assert cleanups[room.id] == 0
            assert "request_status" in table.footprint(room.id)
    # every room's transitions form one legal, ordered chain
    last: dict[int, KVPoll] = {}
    for rec in obs.transitions:
        assert last.get(rec.room, KVPoll.Bootstrapping) is rec.src
        last[rec.room] = rec.dst
    assert max(cleanups.values(), default=0) <= 1
