"""Prefill's rooms that end early: no page list waits for a dead room, no room waits for a gone decode.

Both managers in one process (real NIXL, real ZMQ), deadlines of 30 s: a room that ends here
ended on the event under test, well before any deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kvroom import (
    DuplicateRoomError,
    KVManager,
    KVPoll,
    KVReceiver,
    KVSender,
    ManagerConfig,
    PeerLostError,
    RemoteFailureError,
    request_fingerprint,
)
from kvroom.fsm import Deadlines
from kvroom.transport.notif import parse_notifs
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


def _serve(tx: KVSender, rx: KVReceiver) -> None:
    """Prefill's two pages reach decode; both rooms end Success and are cleared."""
    assert wait(lambda: tx.poll() is KVPoll.WaitingForInput)
    tx.init(2)
    tx.send([0, 1])
    assert wait(lambda: tx.poll() is KVPoll.Success and rx.poll() is KVPoll.Success)
    tx.clear()
    rx.clear()


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
        # the worker forgets the peer, then its page lists: read both once it is done
        gone = lambda: not p.snapshot()["peers"] and p.snapshot()["pending_infos"] == 0  # noqa: E731
        assert wait(gone, 4 * CFG.heartbeat_timeout + 2)
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
        _serve(KVSender(p, None, 4), rx2)
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
    """The commit leaves once Success released the room's lock, so no poll() or command waits on a
    send.  One rank on each side: it is the last WRITTEN (its notification marked commit)."""
    from tests.test_api import ready_pair

    p, d = pair
    rooms: dict[int, KVSender] = {}
    free_at_commit: list[bool] = []
    send = p.side.server.send

    def spy(identity: bytes, kind: str, fields: dict[str, Any] | None = None, payload: bytes = b"") -> bool:
        committed = [n.room for n in parse_notifs(payload) if n.commit] if kind == "written" else []
        if kind == "commit" and fields is not None:
            committed.append(fields["room"])
        for room_id in (r for r in committed if r in rooms):
            lock = rooms[room_id].room.lock
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


FA, FB = request_fingerprint([1, 2, 3]), request_fingerprint([4, 5, 6])


def _held(p: KVManager, d: KVManager, room: int, fingerprint: str, page_list: bool = True) -> KVReceiver:
    """Decode's room ``room`` for request ``fingerprint``; a second receiver of that id is refused."""
    rx = KVReceiver(d, p.bootstrap_addr, room)
    rx.init()
    if page_list:
        rx.send_metadata([1, 2], None, fingerprint=fingerprint)
    with pytest.raises(DuplicateRoomError):
        KVReceiver(d, p.bootstrap_addr, room)
    return rx


def test_a_request_refused_a_held_room_id_fails_its_prefill_room_as_it_opens(
    pair: tuple[KVManager, KVManager],
) -> None:
    """Two requests, one room id: decode's second is told apart by its fingerprint, the first is served."""
    p, d = pair
    rx = _held(p, d, 30, FA)
    d.forgo(30, p.bootstrap_addr, FB, "room 30 is held by another request")
    assert wait(lambda: p.snapshot()["forgone_rooms"] == 1)
    _serve(KVSender(p, None, 30, fingerprint=FA), rx)  # the holder's prefill: untouched
    started = time.monotonic()
    other = KVSender(p, None, 30, fingerprint=FB)  # the refused request's prefill: fails as it opens
    assert wait(lambda: other.poll() is KVPoll.Failed, SOON)
    assert time.monotonic() - started < SOON
    with pytest.raises(RemoteFailureError, match="held by another request"):
        other.failure_exception()
    assert p.snapshot()["forgone_rooms"] == 0
    assert p.footprint(30) == d.footprint(30) == frozenset()


def test_a_request_refused_a_held_room_id_fails_its_open_prefill_room_at_once(
    pair: tuple[KVManager, KVManager],
) -> None:
    """Prefill's room for the refused request is open and waits: it fails now, the holder's room lives."""
    p, d = pair
    rx = _held(p, d, 31, FA, page_list=False)
    tx = KVSender(p, None, 31, fingerprint=FB)
    assert wait(lambda: p.table.get(31) is not None)
    started = time.monotonic()
    d.forgo(31, p.bootstrap_addr, FB, "room 31 is held by another request")
    assert wait(lambda: tx.poll() is KVPoll.Failed, SOON)
    assert time.monotonic() - started < SOON
    with pytest.raises(RemoteFailureError, match="held by another request"):
        tx.failure_exception()
    assert rx.poll() is KVPoll.Bootstrapping  # no FAILED came back for the id decode holds
    assert p.snapshot()["forgone_rooms"] == 0
    rx.abort("done")
    assert wait(lambda: rx.poll() is KVPoll.Failed)


def test_a_refused_request_never_fails_another_requests_room(pair: tuple[KVManager, KVManager]) -> None:
    """Prefill's open room is for a request other than the refused one: it waits and is served."""
    p, d = pair
    tx = KVSender(p, None, 32, fingerprint=FA)
    assert wait(lambda: p.table.get(32) is not None)
    rx = _held(p, d, 32, FA, page_list=False)
    d.forgo(32, p.bootstrap_addr, FB, "refused")
    assert wait(lambda: p.snapshot()["forgone_rooms"] == 1)
    assert tx.poll() is KVPoll.Bootstrapping
    rx.send_metadata([1, 2], None, fingerprint=FA)
    _serve(tx, rx)


def test_a_refused_request_with_the_holders_tokens_waits_for_the_next_room(
    pair: tuple[KVManager, KVManager],
) -> None:
    """Same tokens, same id: the room decode bound is the holder's; the refusal is for the one after."""
    p, d = pair
    rx = _held(p, d, 33, FA)
    tx = KVSender(p, None, 33, fingerprint=FA)
    assert wait(lambda: tx.poll() is KVPoll.WaitingForInput)
    d.forgo(33, p.bootstrap_addr, FA, "the twin was refused")
    assert wait(lambda: p.snapshot()["forgone_rooms"] == 1)
    _serve(tx, rx)
    twin = KVSender(p, None, 33, fingerprint=FA)
    assert wait(lambda: twin.poll() is KVPoll.Failed, SOON)


def test_forgo_is_a_decode_call_with_a_fingerprint(pair: tuple[KVManager, KVManager]) -> None:
    p, d = pair
    with pytest.raises(ValueError, match="decode-side"):
        p.forgo(1, p.bootstrap_addr, FA, "x")
    with pytest.raises(ValueError, match="fingerprint"):
        d.forgo(1, p.bootstrap_addr, None, "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fingerprint"):
        d.forgo(1, p.bootstrap_addr, "x" * 129, "x")
    with pytest.raises(ValueError, match="room_id"):
        d.forgo(-1, p.bootstrap_addr, FA, "x")
    with pytest.raises(ValueError, match="bootstrap"):
        d.forgo(1, [], FA, "x")
    with pytest.raises(TypeError, match="reason"):
        d.forgo(1, p.bootstrap_addr, FA, None)  # type: ignore[arg-type]


def test_a_refusal_said_before_the_handshake_goes_out_after_it(pair: tuple[KVManager, KVManager]) -> None:
    """First contact: the refusal waits for the greeting it started, then reaches prefill."""
    p, _ = pair
    fresh = KVManager("decode", make_pool(), config=CFG, audit=False)
    try:
        fresh.forgo(34, p.bootstrap_addr, FB, "refused before any room")
        assert wait(lambda: p.snapshot()["forgone_rooms"] == 1)
        tx = KVSender(p, None, 34, fingerprint=FB)
        assert wait(lambda: tx.poll() is KVPoll.Failed, SOON)
        with pytest.raises(RemoteFailureError, match="refused before any room"):
            tx.failure_exception()
    finally:
        fresh.close()


def test_a_room_with_one_rank_on_each_side_commits_in_its_last_written_with_no_vote(
    pair: tuple[KVManager, KVManager],
) -> None:
    """Protocol 8: prefill TP 1 to decode TP 1 needs no READY and no COMMIT message."""
    from tests.test_api import ready_pair

    p, d = pair
    tx, rx = ready_pair(p, d, 31)
    sent: list[tuple[str, bool]] = []  # (kind, carries the room's commit), both directions
    server_send = p.side.server.send

    def prefill_spy(
        identity: bytes, kind: str, fields: dict[str, Any] | None = None, payload: bytes = b""
    ) -> bool:
        sent.append((kind, any(n.room == 31 and n.commit for n in parse_notifs(payload))))
        return server_send(identity, kind, fields, payload)

    p.side.server.send = prefill_spy  # type: ignore[method-assign]
    (peer,) = d.side.peers.values()
    client_send = peer.client.send

    def decode_spy(kind: str, fields: dict[str, Any] | None = None, payload: bytes = b"") -> Any:
        sent.append((kind, False))
        return client_send(kind, fields, payload)

    peer.client.send = decode_spy  # type: ignore[method-assign]
    tx.send([0, 1, 2, 3])
    assert wait(lambda: rx.poll() is KVPoll.Success and tx.poll() is KVPoll.Success)
    kinds = [kind for kind, _ in sent if kind not in ("ping", "pong")]
    assert ("written", True) in sent
    assert "ready" not in kinds and "commit" not in kinds, kinds


def test_a_room_aborted_on_prefill_with_its_write_in_flight_fails_on_both_sides(
    pair: tuple[KVManager, KVManager],
) -> None:
    """The commit is decided when a WRITE is counted DONE: a room Failed by then is never marked committed."""
    from tests.test_api import ready_pair

    p, d = pair
    tx, rx = ready_pair(p, d, 32)
    agent = p.side.m.agent
    write, state = agent.write, agent.state
    held = threading.Event()
    held.set()

    def write_in_flight(*args: Any) -> Any:
        transfer, _ = write(*args)
        return transfer, "PROC"  # the bytes moved; the worker hears DONE only once released

    agent.write = write_in_flight  # type: ignore[method-assign]
    agent.state = lambda t: "PROC" if held.is_set() else state(t)  # type: ignore[method-assign]
    tx.send([0, 1, 2, 3])
    assert wait(lambda: p.side.active)  # posted, not DONE
    tx.abort("the scheduler gave up")
    assert tx.poll() is KVPoll.Failed
    time.sleep(0.05)  # the decode room is not told while the WRITE may still land
    assert rx.poll() in (KVPoll.WaitingForInput, KVPoll.Transferring)
    held.clear()
    assert wait(lambda: rx.poll() is KVPoll.Failed)
    assert tx.poll() is KVPoll.Failed
