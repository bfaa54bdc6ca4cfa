"""The scheduler API with both managers in one process (real NIXL, real ZMQ)."""

from __future__ import annotations

import dataclasses
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from kvroom import (
    BootstrapError,
    DuplicateRoomError,
    IncompatiblePeerError,
    KVManager,
    KVPoll,
    KVPool,
    KVReceiver,
    KVRoomError,
    KVSender,
    ManagerConfig,
    PeerLostError,
    RemoteFailureError,
    RoomAbortedError,
    RoomStateError,
)
from kvroom.fsm import Deadlines

FAST = ManagerConfig(heartbeat_interval=0.1, heartbeat_timeout=1.0, deadlines=Deadlines(5.0, 10.0, 5.0))


def make_pool(pages: int = 64, dtype: torch.dtype = torch.uint8, layers: int = 2) -> KVPool:
    return KVPool(
        [torch.zeros(pages, 256, dtype=dtype) for _ in range(layers)], torch.zeros(8, 16, dtype=torch.uint8)
    )


def managers(config: ManagerConfig) -> Iterator[tuple[KVManager, KVManager]]:
    """A prefill and a decode manager in this process (for a fixture to yield from)."""
    prefill = KVManager("prefill", make_pool(), config=config, audit=False)
    decode = KVManager("decode", make_pool(), config=config, audit=False)
    yield prefill, decode
    prefill.close()
    decode.close()


@pytest.fixture
def pair() -> Iterator[tuple[KVManager, KVManager]]:
    yield from managers(FAST)


def wait(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def ready_pair(p: KVManager, d: KVManager, room: int, pages: int = 4) -> tuple[KVSender, KVReceiver]:
    rx = KVReceiver(d, p.bootstrap_addr, room)
    rx.init()
    tx = KVSender(p, p.bootstrap_addr, room)
    rx.send_metadata(np.arange(pages) + 10, aux_index=1)
    assert wait(lambda: tx.poll() is KVPoll.WaitingForInput)
    tx.init(pages, aux_index=2)
    return tx, rx


@pytest.mark.parametrize("tick", [0.0001, 0.002], ids=["waits-on-sockets-between-polls", "zmq-waits"])
def test_either_busy_poll_tick_moves_a_room(tick: float) -> None:
    """Below a millisecond the worker waits on its sockets between NIXL polls, above it ZMQ's poll
    waits: prefill's tick (WRITEs in flight) and decode's (rooms waiting for data) alike."""
    config = dataclasses.replace(FAST, busy_poll_interval=tick, target_poll_interval=tick)
    p = KVManager("prefill", make_pool(), config=config, audit=False)
    d = KVManager("decode", make_pool(), config=config, audit=False)
    try:
        p.pool.layers[0][3:7].fill_(9)
        tx, rx = ready_pair(p, d, 1)
        tx.send([3, 4, 5, 6])
        assert wait(lambda: rx.poll() is KVPoll.Success and tx.poll() is KVPoll.Success)
        assert bool((d.pool.layers[0][10:14] == 9).all())
    finally:
        p.close()
        d.close()


@pytest.mark.parametrize("tick", [0.0, -1.0, 0.5])
@pytest.mark.parametrize("name", ["busy_poll_interval", "target_poll_interval"])
def test_a_poll_interval_out_of_range_is_refused(name: str, tick: float) -> None:
    with pytest.raises(ValueError, match=name):
        ManagerConfig(**{name: tick})


def test_each_side_polls_nixl_at_its_own_tick_only_while_busy() -> None:
    """Decode ticks at target_poll_interval while a room holds a page list (prefill's tick, with
    WRITEs in flight, lasts microseconds here: the room's success shows it ended); idle, neither
    ticks."""
    config = dataclasses.replace(FAST, busy_poll_interval=0.0003, target_poll_interval=0.004)
    p = KVManager("prefill", make_pool(), config=config, audit=False)
    d = KVManager("decode", make_pool(), config=config, audit=False)
    try:
        assert p.side.tick() is None and d.side.tick() is None
        tx, rx = ready_pair(p, d, 1)
        assert wait(lambda: d.side.tick() == 0.004)  # a page list sent: its room waits for data
        assert wait(lambda: tx.poll() is KVPoll.WaitingForInput)
        tx.send([3, 4, 5, 6])
        assert wait(lambda: rx.poll() is KVPoll.Success and tx.poll() is KVPoll.Success)
        assert d.side.tick() == 0.004  # a page list lives until the scheduler clears its room
        rx.clear()
        tx.clear()
        assert wait(lambda: p.side.tick() is None and d.side.tick() is None)
    finally:
        p.close()
        d.close()


def test_transfer_moves_bytes_and_releases_every_handle_once(pair: tuple[KVManager, KVManager]) -> None:
    p, d = pair
    for layer in p.pool.layers:
        layer.copy_(torch.randint(0, 255, layer.shape, dtype=torch.uint8))
    p.pool.aux[2] = 7
    tx, rx = ready_pair(p, d, 1, pages=6)
    tx.send([0, 1, 2])
    tx.send([5, 4, 3])
    assert wait(lambda: rx.poll() is KVPoll.Success and tx.poll() is KVPoll.Success)
    for src, dst in zip(p.pool.layers, d.pool.layers, strict=True):
        assert torch.equal(dst[10:16], src[[0, 1, 2, 5, 4, 3]])
    assert torch.equal(d.pool.aux[1], p.pool.aux[2])
    assert wait(lambda: p.snapshot()["in_flight"] == 0)
    assert p.agent.released == p.agent.posted > 0
    tx.clear()
    rx.clear()
    assert p.footprint(1) == d.footprint(1) == frozenset()


def test_poll_does_not_wait_on_the_room_lock_but_a_failed_room_is_read_under_it(
    pair: tuple[KVManager, KVManager],
) -> None:
    """The worker holds a room's lock while it moves the room on; a scheduler's poll() reads past it.

    Only Failed is read again under the lock: its cleanup runs under it, so a Failed room is
    never seen before its stores are empty.
    """
    p, _ = pair
    tx = KVSender(p, None, 9)
    polled: list[KVPoll] = []

    def poll() -> None:
        polled.append(tx.poll())

    with tx.room.lock:  # as the worker holds it mid-transition
        reader = threading.Thread(target=poll)
        reader.start()
        reader.join(10.0)
        assert polled == [KVPoll.Bootstrapping]
    tx.abort("the request was aborted")
    assert tx.poll() is KVPoll.Failed
    with tx.room.lock:  # as the table holds it while Failed's cleanup runs
        reader = threading.Thread(target=poll)
        reader.start()
        reader.join(0.2)
        assert reader.is_alive() and len(polled) == 1  # waits for the cleanup
    reader.join(10.0)
    assert polled == [KVPoll.Bootstrapping, KVPoll.Failed]
    assert p.footprint(9) == frozenset()


def test_duplicate_room_is_rejected_and_the_existing_room_untouched(
    pair: tuple[KVManager, KVManager],
) -> None:
    p, d = pair
    tx, rx = ready_pair(p, d, 2)
    with pytest.raises(DuplicateRoomError, match="room 2"):
        KVSender(p, p.bootstrap_addr, 2)
    with pytest.raises(DuplicateRoomError, match="room 2"):
        KVReceiver(d, p.bootstrap_addr, 2)
    tx.send([0, 1, 2, 3])
    assert wait(lambda: rx.poll() is KVPoll.Success)


def test_send_misuse_raises_precise_errors(pair: tuple[KVManager, KVManager]) -> None:
    p, d = pair
    early = KVSender(p, p.bootstrap_addr, 3)
    with pytest.raises(RoomStateError, match=r"room 3 \(sender\): event 'send' .*Bootstrapping: call init"):
        early.send([0])
    early.init(2)
    with pytest.raises(RoomStateError, match="event 'send' is not allowed in state Bootstrapping"):
        early.send([0])
    with pytest.raises(RoomStateError, match="init\\(\\) was already called"):
        early.init(2)
    tx, _ = ready_pair(p, d, 4, pages=2)
    with pytest.raises(ValueError, match="exceed init"):
        tx.send([0, 1, 2])
    with pytest.raises(ValueError, match="out of range"):
        tx.send([64])
    with pytest.raises(ValueError, match="negative"):
        tx.send([-1])
    with pytest.raises(ValueError, match="duplicate"):
        tx.send([1, 1])
    with pytest.raises(TypeError, match="integers"):
        tx.send(np.array([0.5]))
    with pytest.raises(ValueError, match="state_indices given, but the model has no state buffers"):
        tx.send([0, 1], state_indices=[0])
    tx.send([0, 1])
    assert wait(lambda: tx.poll() is KVPoll.Success)
    with pytest.raises(RoomStateError, match="not allowed in state Success"):
        tx.send([])


def test_receiver_misuse_raises_precise_errors(pair: tuple[KVManager, KVManager]) -> None:
    p, d = pair
    rx = KVReceiver(d, p.bootstrap_addr, 5)
    with pytest.raises(ValueError, match="aux_index 99 out of range"):
        rx.send_metadata([0], aux_index=99)
    with pytest.raises(ValueError, match="decode_prefix_len"):
        rx.send_metadata([0], decode_prefix_len=-1)
    rx.send_metadata([0, 1])
    with pytest.raises(RoomStateError, match="metadata already sent"):
        rx.send_metadata([2, 3])
    with pytest.raises(ValueError, match="host:port"):
        KVReceiver(d, "nowhere", 6)
    with pytest.raises(ValueError, match="prefill"):
        KVSender(d, None, 7)


def test_sending_on_a_failed_room_is_silent(pair: tuple[KVManager, KVManager]) -> None:
    p, d = pair
    tx, rx = ready_pair(p, d, 8)
    tx.abort()
    assert tx.poll() is KVPoll.Failed
    tx.send([0, 1])  # the scheduler may race with a failure: no exception
    with pytest.raises(RoomAbortedError):
        tx.failure_exception()
    assert p.footprint(8) == frozenset()
    assert wait(lambda: rx.poll() is KVPoll.Failed)
    with pytest.raises(RemoteFailureError, match="prefill failed the room"):
        rx.failure_exception()
    assert d.footprint(8) == frozenset()


def test_decode_abort_before_metadata_fails_at_once(pair: tuple[KVManager, KVManager]) -> None:
    p, d = pair
    rx = KVReceiver(d, p.bootstrap_addr, 9)
    rx.abort()
    assert wait(lambda: rx.poll() is KVPoll.Failed, 2)
    with pytest.raises(RoomAbortedError):
        rx.failure_exception()


def test_decode_abort_waits_for_prefill_confirmation(pair: tuple[KVManager, KVManager]) -> None:
    p, d = pair
    tx, rx = ready_pair(p, d, 10)
    rx.abort("user cancelled")
    assert wait(lambda: rx.poll() is KVPoll.Failed)
    assert tx.poll() is KVPoll.Failed  # prefill failed it before confirming
    with pytest.raises(RoomAbortedError, match="user cancelled"):
        rx.failure_exception()
    with pytest.raises(RemoteFailureError, match="aborted by decode: user cancelled"):
        tx.failure_exception()


def test_late_duplicate_and_unknown_messages_create_no_state(pair: tuple[KVManager, KVManager]) -> None:
    p, d = pair
    tx, rx = ready_pair(p, d, 11, pages=2)
    tx.send([0, 1])
    assert wait(lambda: rx.poll() is KVPoll.Success and tx.poll() is KVPoll.Success)
    tx.clear()
    rx.clear()
    peer = d.side.peers[p.bootstrap_addr]

    def forge() -> None:
        fields = {"room": 11, "aux_index": None, "prefix_pages": 0, "npages": 1}
        peer.client.send("room", {**fields, "staging": None, "chunk_pages": 16}, b"\0" * 8)
        peer.client.send("abort", {"room": 999, "reason": "x"})
        d.agent.notify(d.agent_name, b"kvr2:11:0:0:1:1")  # a stray notification to ourselves

    d.submit(forge)
    time.sleep(0.3)
    assert len(p.table) == 0 and len(d.table) == 0
    assert p.footprint(11) == d.footprint(11) == p.footprint(999) == frozenset()
    assert tx.room.state is KVPoll.Success and rx.room.state is KVPoll.Success  # untouched


def test_a_bootstrap_address_that_does_not_answer_fails_the_room(pair: tuple[KVManager, KVManager]) -> None:
    _, d = pair
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rx = KVReceiver(d, f"127.0.0.1:{port}", 12)
    rx.init()
    rx.send_metadata([0])
    assert wait(lambda: rx.poll() is KVPoll.Failed, 4)
    with pytest.raises(PeerLostError, match="did not answer"):
        rx.failure_exception()
    assert d.footprint(12) == frozenset()


def test_port_in_use_is_a_clear_bootstrap_error(pair: tuple[KVManager, KVManager]) -> None:
    p, _ = pair
    port = int(p.bootstrap_addr.rsplit(":", 1)[1])
    with pytest.raises(BootstrapError, match=rf"cannot listen on 127\.0\.0\.1:{port}.*choose another port"):
        KVManager("prefill", make_pool(), bootstrap_port=port, audit=False)


def test_incompatible_layouts_are_refused_before_any_room(pair: tuple[KVManager, KVManager]) -> None:
    p, _ = pair
    odd = KVManager("decode", make_pool(dtype=torch.float16), config=FAST, audit=False)
    try:
        rx = KVReceiver(odd, p.bootstrap_addr, 13)
        rx.init()
        rx.send_metadata([0])
        assert wait(lambda: rx.poll() is KVPoll.Failed)
        with pytest.raises(IncompatiblePeerError, match=r"dtype \(layer\.0: ours 'uint8', theirs 'float16'"):
            rx.failure_exception()
        assert p.snapshot()["peers"] == [] and len(p.table) == 0
    finally:
        odd.close()


def test_a_worker_bug_is_not_swallowed(pair: tuple[KVManager, KVManager]) -> None:
    p, _ = pair
    tx = KVSender(p, p.bootstrap_addr, 14)

    def bug() -> None:
        raise ZeroDivisionError("a bug in the worker")

    p.submit(bug)
    assert wait(lambda: tx.room.state is KVPoll.Failed)
    with pytest.raises(RuntimeError, match="worker crashed") as info:
        tx.poll()
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert p.footprint(14) == frozenset()


def test_operator_snapshot_counts_rooms_per_state(pair: tuple[KVManager, KVManager]) -> None:
    p, _ = pair
    KVSender(p, p.bootstrap_addr, 15)
    snap = p.snapshot()
    assert snap["rooms"]["Bootstrapping"] == 1 and snap["role"] == "sender"
    assert snap["bootstrap_addr"] == p.bootstrap_addr


def test_stall_watch_measures_only_gaps_longer_than_a_heartbeat_interval() -> None:
    from kvroom.manager import StallWatch

    watch = StallWatch(interval=0.5, now=10.0)
    assert watch.tick(10.004) == 0.0  # an ordinary loop iteration
    assert watch.tick(10.4) == 0.0
    assert watch.tick(13.4) == pytest.approx(3.0)  # a SIGSTOP, a long GC pause
    assert watch.pause == pytest.approx(3.0) and watch.pauses == 1
    assert watch.tick(13.41) == 0.0 and watch.pause == 0.0


def test_a_burst_of_queued_commands_is_spread_over_loop_turns(pair: tuple[KVManager, KVManager]) -> None:
    # a burst of send() calls queues many WRITEs; the worker runs them in slices of
    # COMMAND_BUDGET so messages, heartbeats and deadlines are served between
    # (and its stall watch never mistakes the burst for a pause of the process)
    from kvroom.manager import COMMAND_BUDGET

    prefill, _ = pair
    turns: list[float] = []  # the loop tick each command ran in
    for _ in range(12):
        prefill.submit(lambda: (turns.append(prefill.stall.last), time.sleep(COMMAND_BUDGET / 2)))
    assert wait(lambda: len(turns) == 12)
    # a turn runs commands until the budget is spent: at most 2 of these (fewer when sleeps overrun)
    assert len(set(turns)) >= 6, turns


def _held(manager: KVManager) -> Callable[[], None]:
    """Hold the worker in a command until the returned function is called (sends queue behind it)."""
    import threading

    held, release = threading.Event(), threading.Event()
    manager.submit(lambda: (held.set(), release.wait(10)))
    assert held.wait(5)
    return release.set


def _burst_rooms(p: KVManager, d: KVManager, rooms: range) -> list[tuple[KVSender, KVReceiver]]:
    for layer in p.pool.layers:
        layer.copy_(torch.randint(0, 255, layer.shape, dtype=torch.uint8))
    out = []
    for room in rooms:
        rx = KVReceiver(d, p.bootstrap_addr, room)
        rx.init()
        tx = KVSender(p, p.bootstrap_addr, room)
        rx.send_metadata(np.arange(4) + 4 * room, aux_index=room % 8)
        out.append((tx, rx))
    for tx, _ in out:
        assert wait(lambda tx=tx: tx.poll() is KVPoll.WaitingForInput)
        tx.init(4, aux_index=tx.room.id % 8)
    return out


def test_a_burst_of_sends_is_posted_as_one_joined_transfer_and_every_room_lands(
    pair: tuple[KVManager, KVManager],
) -> None:
    # a forward batch ends with one send() per request: the worker joins the WRITEs it
    # finds queued for one decode into one NIXL transfer; decode counts each as its own
    p, d = pair
    rooms = _burst_rooms(p, d, range(8))
    posted = p.agent.posted
    release = _held(p)
    for tx, _ in rooms:
        r = tx.room.id
        tx.send([8 * r + 1, 8 * r])
        tx.send([8 * r + 7, 8 * r + 3])
    release()
    assert wait(lambda: all(tx.poll() is rx.poll() is KVPoll.Success for tx, rx in rooms))
    assert p.agent.posted - posted == 1  # 16 chunks, aux rows included, in one transfer
    for tx, _ in rooms:
        r = tx.room.id
        for src, dst in zip(p.pool.layers, d.pool.layers, strict=True):
            assert torch.equal(dst[4 * r : 4 * r + 4], src[[8 * r + 1, 8 * r, 8 * r + 7, 8 * r + 3]])
        assert torch.equal(d.pool.aux[r % 8], p.pool.aux[r % 8])
    assert wait(lambda: p.snapshot()["in_flight"] == 0) and p.agent.released == p.agent.posted


def test_a_room_aborted_in_a_burst_is_left_out_of_the_joined_transfer(
    pair: tuple[KVManager, KVManager],
) -> None:
    p, d = pair
    rooms = _burst_rooms(p, d, range(4))
    release = _held(p)
    for tx, _ in rooms:
        tx.send([8 * tx.room.id + k for k in range(4)])
    rooms[2][0].abort("the scheduler dropped it")
    release()
    others = [pair_ for i, pair_ in enumerate(rooms) if i != 2]
    assert wait(lambda: all(tx.poll() is rx.poll() is KVPoll.Success for tx, rx in others))
    assert wait(lambda: rooms[2][1].poll() is KVPoll.Failed) and rooms[2][0].poll() is KVPoll.Failed
    assert not d.pool.layers[0][8:12].any()  # none of its bytes was posted
    with pytest.raises(RemoteFailureError, match="dropped it"):
        rooms[2][1].failure_exception()


def test_a_failed_joined_transfer_fails_the_rooms_it_carries_and_no_other(
    pair: tuple[KVManager, KVManager],
) -> None:
    from nixl._bindings import nixlBackendError

    p, d = pair
    rooms = _burst_rooms(p, d, range(5))
    agent = p.agent._agent
    real = agent.transfer

    def failing(handle: object) -> object:
        agent.transfer = real
        raise nixlBackendError("injected: the WRITE failed to start")

    release = _held(p)
    agent.transfer = failing
    for tx, _ in rooms[:4]:
        tx.send([8 * tx.room.id + k for k in range(4)])
    release()
    assert wait(lambda: all(tx.poll() is rx.poll() is KVPoll.Failed for tx, rx in rooms[:4]))
    for tx, _ in rooms[:4]:  # one WRITE carried four rooms: each failure names its own room only
        with pytest.raises(KVRoomError, match=rf"^room {tx.room.id}: WRITE to .*injected") as caught:
            tx.failure_exception()
        assert re.findall(r"\brooms? \[?(\d+)", str(caught.value)) == [str(tx.room.id)]
    tx, rx = rooms[4]
    tx.send([32, 33, 34, 35])  # a room of a later turn is untouched
    assert wait(lambda: tx.poll() is rx.poll() is KVPoll.Success)
