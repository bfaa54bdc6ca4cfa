"""Prefill's rooms that end early: no page list waits for a dead room, no room waits for a gone decode.

Both managers in one process (real NIXL, real ZMQ), deadlines of 30 s: a room that ends here
ended on the event under test, well before any deadline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from kvroom import KVManager, KVPoll, KVReceiver, KVSender, ManagerConfig, PeerLostError, RemoteFailureError
from kvroom.fsm import Deadlines
from tests.test_api import make_pool, managers, wait

CFG = ManagerConfig(heartbeat_interval=0.1, heartbeat_timeout=1.0, deadlines=Deadlines(30.0, 30.0, 30.0))
SOON = CFG.deadlines.bootstrapping / 4


@pytest.fixture
def pair() -> Iterator[tuple[KVManager, KVManager]]:
    yield from managers(CFG)


def _waiting_page_list(p: KVManager, d: KVManager, room: int) -> KVReceiver:
    rx = KVReceiver(d, p.bootstrap_addr, room)
    rx.init()
    rx.send_metadata([1, 2], None)
    assert wait(lambda: p.side.pending.get(room) is not None)
    return rx


def test_a_room_failed_as_it_opens_answers_the_page_list_that_waited(
    pair: tuple[KVManager, KVManager],
) -> None:
    """A prefill request that ends without KV (aborted unscheduled) fails its decode at once."""
    p, d = pair
    rx = _waiting_page_list(p, d, 1)
    started = time.monotonic()
    KVSender(p, None, 1).abort("the prefill request was aborted before it was scheduled")
    assert wait(lambda: rx.poll() is KVPoll.Failed, SOON)
    assert time.monotonic() - started < SOON
    with pytest.raises(RemoteFailureError, match="aborted before it was scheduled"):
        rx.failure_exception()
    assert wait(lambda: p.snapshot()["pending_infos"] == 0)
    assert p.footprint(1) == d.footprint(1) == frozenset()


def test_a_decode_abort_while_its_page_list_waits_fails_the_room_as_it_opens(
    pair: tuple[KVManager, KVManager],
) -> None:
    p, d = pair
    rx = _waiting_page_list(p, d, 2)
    rx.abort("client disconnected")
    assert wait(lambda: rx.poll() is KVPoll.Failed, SOON)
    assert wait(lambda: p.snapshot()["pending_infos"] == 0)
    started = time.monotonic()
    tx = KVSender(p, None, 2)
    assert wait(lambda: tx.poll() is KVPoll.Failed, SOON)
    assert time.monotonic() - started < SOON
    with pytest.raises(RemoteFailureError, match="client disconnected"):
        tx.failure_exception()
    assert p.footprint(2) == frozenset()


def test_a_decode_lost_while_its_page_list_waits_fails_the_room_as_it_opens() -> None:
    p = KVManager("prefill", make_pool(), config=CFG, audit=False)
    d = KVManager("decode", make_pool(), config=CFG, audit=False)
    try:
        _waiting_page_list(p, d, 3)
        d.close()  # gone: no more heartbeats
        assert wait(lambda: not p.snapshot()["peers"], 4 * CFG.heartbeat_timeout + 2)
        assert p.snapshot()["pending_infos"] == 0
        started = time.monotonic()
        tx = KVSender(p, None, 3)
        assert wait(lambda: tx.poll() is KVPoll.Failed, SOON)
        assert time.monotonic() - started < SOON
        with pytest.raises(PeerLostError, match=r"room 3: decode .* silent"):
            tx.failure_exception()
    finally:
        p.close()
        d.close()


def test_another_decodes_waiting_page_list_keeps_an_orphaned_room_alive(
    pair: tuple[KVManager, KVManager],
) -> None:
    """Without keys a principal is an agent: one decode leaving does not fail another's room."""
    p, d = pair
    other = KVManager("decode", make_pool(), config=CFG, audit=False)
    try:
        rx = _waiting_page_list(p, d, 4)
        rx.abort("client disconnected")
        assert wait(lambda: rx.poll() is KVPoll.Failed)
        rx2 = KVReceiver(other, p.bootstrap_addr, 4)
        rx2.init()
        rx2.send_metadata([5, 6], None)
        assert wait(lambda: p.side.pending.get(4) is not None)
        tx = KVSender(p, None, 4)
        assert wait(lambda: tx.poll() is KVPoll.WaitingForInput)
        tx.init(2)
        tx.send([0, 1])
        assert wait(lambda: tx.poll() is KVPoll.Success and rx2.poll() is KVPoll.Success)
        tx.clear()
        rx2.clear()
    finally:
        other.close()


@pytest.mark.parametrize("greeted", [False, True], ids=["first-contact", "greeted"])
def test_a_decode_that_aborts_before_its_page_list_fails_the_open_room_at_once(
    pair: tuple[KVManager, KVManager], greeted: bool
) -> None:
    """Prefill's room is open and waits; decode aborts its room before sending a page list.

    First contact: decode's abort waits for the handshake the receiver started, then goes out.
    """
    p, d = pair
    if greeted:
        _waiting_page_list(p, d, 5).abort("warm-up")
        assert wait(lambda: p.snapshot()["pending_infos"] == 0)
    tx = KVSender(p, None, 4)
    started = time.monotonic()
    rx = KVReceiver(d, p.bootstrap_addr, 4)
    rx.init()
    rx.abort("client disconnected")
    assert wait(lambda: tx.poll() is KVPoll.Failed, SOON)
    assert time.monotonic() - started < SOON
    with pytest.raises(RemoteFailureError, match="client disconnected"):
        tx.failure_exception()
    assert wait(lambda: rx.poll() is KVPoll.Failed, SOON)
    assert p.footprint(4) == d.footprint(4) == frozenset()


def test_the_coordinator_sends_commit_holding_no_room_lock(pair: tuple[KVManager, KVManager]) -> None:
    """COMMIT leaves once Success released the room's lock, so no poll() or command waits on a send."""
    from tests.test_api import ready_pair

    p, d = pair
    rooms: dict[int, KVSender] = {}
    free_at_commit: list[bool] = []
    send = p.side.server.send

    def spy(identity: bytes, kind: str, fields: dict[str, Any] | None = None, payload: bytes = b"") -> bool:
        if kind == "commit" and fields is not None and fields["room"] in rooms:
            lock = rooms[fields["room"]].room.lock
            free = lock.acquire(blocking=False)  # a plain Lock: not re-entrant, so False while held
            if free:
                lock.release()
            free_at_commit.append(free)
        return send(identity, kind, fields, payload)

    p.side.server.send = spy  # type: ignore[method-assign]
    for room in (21, 22, 23):
        tx, rx = ready_pair(p, d, room)
        rooms[room] = tx
        tx.send([0, 1, 2, 3])
        assert wait(lambda tx=tx, rx=rx: rx.poll() is KVPoll.Success and tx.poll() is KVPoll.Success)
        tx.clear()
        rx.clear()
    assert free_at_commit == [True, True, True]
