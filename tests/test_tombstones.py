"""Tombstones: dead for everyone or only for the principals that aborted, bounded in age and count."""

from __future__ import annotations

from kvroom.node.tombstones import Forgone, Tombstones


def test_an_abort_buries_a_room_only_for_its_sender() -> None:
    t = Tombstones(limit=8, ttl=10.0)
    t.add(1, "aborted by B", 0.0, principal="B")
    assert t.reason_for(1, "B") == "aborted by B"
    assert t.reason_for(1, "A") is None  # another peer's room of that id is untouched
    t.add(1, "aborted by C", 1.0, principal="C")
    assert t.reason_for(1, "B") is not None and t.reason_for(1, "C") is not None
    assert t.reason_for(1, "A") is None


def test_a_failed_room_is_dead_for_everyone_but_never_held_against_a_live_one() -> None:
    t = Tombstones(limit=8, ttl=10.0)
    t.add(2, "failed on prefill", 0.0)
    assert t.reason_for(2, "A") == t.reason_for(2, "B") == "failed on prefill"
    assert t.reason_for(2, "A", held_only=True) is None
    t.add(2, "aborted by B", 1.0, principal="B")  # an abort cannot narrow a room dead for everyone
    assert t.reason_for(2, "A") is not None
    t.add(3, "aborted by B", 1.0, principal="B")
    assert t.reason_for(3, "B", held_only=True) == "aborted by B"


def test_tombstones_are_bounded_by_count_and_age() -> None:
    t = Tombstones(limit=3, ttl=5.0)
    for room in range(5):
        t.add(room, "x", float(room))
    assert list(t) == [2, 3, 4]  # the oldest went first
    t.expire(7.5)  # room 2 expired at 7.0
    assert list(t) == [3, 4]


def test_a_forgone_room_fails_only_for_its_request_and_once() -> None:
    f = Forgone(limit=8, ttl=10.0)
    f.add(1, "fp-b", "refused", 0.0)
    assert f.take(1, "fp-a") is None  # another request's room of that id is untouched
    assert f.take(1, None) is None  # a room without a fingerprint cannot be told apart
    assert f.take(2, "fp-b") is None
    assert f.take(1, "fp-b") == "refused"
    assert f.take(1, "fp-b") is None  # one room fails, not every later one


def test_forgone_rooms_are_bounded_by_count_and_age() -> None:
    f = Forgone(limit=2, ttl=5.0)
    for room in range(3):
        f.add(room, "fp", "x", float(room))
    assert list(f) == [(1, "fp"), (2, "fp")]
    f.expire(6.5)
    assert list(f) == [(2, "fp")]
