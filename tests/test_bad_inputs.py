"""Bad input, one named test each: a clear error (or a clean Failed for that one room), nothing else changed.

Every test runs next to a *bystander* room, mid-transfer between the same two
managers, and checks it is exactly as it was afterwards (and still completes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvroom import (
    BootstrapError,
    DuplicateRoomError,
    IncompatiblePeerError,
    KVManager,
    KVPoll,
    KVPool,
    KVReceiver,
    KVSender,
    PeerLostError,
    RemoteFailureError,
    RoomStateError,
)
from kvroom.transport.codec import MAGIC, encode
from tests.test_api import FAST, make_pool, ready_pair, wait


class Bystander:
    """A room mid-transfer that no bad input may touch."""

    def __init__(self, p: KVManager, d: KVManager) -> None:
        self.p, self.d = p, d
        self.tx, self.rx = ready_pair(p, d, 100, pages=4)
        self.tx.send([0, 1])
        assert wait(lambda: self.rx.poll() is KVPoll.Transferring)
        self.before = self.state()

    def state(self) -> tuple[object, ...]:
        return (self.tx.room.state, self.rx.room.state, self.p.footprint(100), self.d.footprint(100))

    def check(self) -> None:
        assert self.state() == self.before, "a bad input changed another room"
        self.tx.send([2, 3])
        assert wait(lambda: self.rx.poll() is KVPoll.Success and self.tx.poll() is KVPoll.Success)


@pytest.fixture(scope="module")
def managers() -> Iterator[tuple[KVManager, KVManager]]:
    p = KVManager("prefill", make_pool(), config=FAST, audit=False)
    d = KVManager("decode", make_pool(), config=FAST, audit=False)
    yield p, d
    p.close()
    d.close()


@pytest.fixture
def env(managers: tuple[KVManager, KVManager]) -> Iterator[tuple[KVManager, KVManager]]:
    p, d = managers
    bystander = Bystander(p, d)
    yield p, d
    bystander.check()
    bystander.tx.clear()
    bystander.rx.clear()


_room_ids = iter(range(1000, 10**6))


def fresh(p: KVManager, d: KVManager, pages: int = 4) -> tuple[KVSender, KVReceiver]:
    return ready_pair(p, d, next(_room_ids), pages=pages)


# -- page indices -----------------------------------------------------------------


def test_negative_page_index(env: tuple[KVManager, KVManager]) -> None:
    tx, _rx = fresh(*env)
    with pytest.raises(ValueError, match="negative page index -1"):
        tx.send([0, -1])
    assert tx.poll() is KVPoll.WaitingForInput


def test_out_of_range_page_index(env: tuple[KVManager, KVManager]) -> None:
    p, d = env
    rx = KVReceiver(d, p.bootstrap_addr, next(_room_ids))
    with pytest.raises(ValueError, match="page index 64 out of range for a pool of 64 pages"):
        rx.send_metadata([63, 64])
    assert rx.poll() is KVPoll.Bootstrapping and d.footprint(rx.bootstrap_room) == {"request_status"}


def test_duplicate_page_indices(env: tuple[KVManager, KVManager]) -> None:
    tx, _ = fresh(*env)
    with pytest.raises(ValueError, match="duplicate page indices"):
        tx.send([3, 3])


def test_non_integer_page_indices(env: tuple[KVManager, KVManager]) -> None:
    tx, _ = fresh(*env)
    with pytest.raises(TypeError, match="must be integers"):
        tx.send(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="one-dimensional"):
        tx.send(np.array([[0, 1]]))


def test_more_pages_than_init_declared(env: tuple[KVManager, KVManager]) -> None:
    tx, _ = fresh(*env)
    with pytest.raises(ValueError, match=r"0 \+ 5 pages exceed init\(num_pages=4\)"):
        tx.send([0, 1, 2, 3, 4])


def test_decode_page_count_disagreeing_with_init_fails_only_that_room(
    env: tuple[KVManager, KVManager],
) -> None:
    p, d = env
    room = next(_room_ids)
    rx = KVReceiver(d, p.bootstrap_addr, room)
    rx.init()
    rx.send_metadata([10, 11, 12])
    tx = KVSender(p, p.bootstrap_addr, room)
    assert wait(lambda: tx.poll() is KVPoll.WaitingForInput)
    tx.init(5)
    assert wait(lambda: tx.poll() is KVPoll.Failed and rx.poll() is KVPoll.Failed)
    with pytest.raises(RemoteFailureError, match=r"decode .* sent 3 pages .* prefill has 5 pages"):
        tx.failure_exception()
    assert p.footprint(room) == d.footprint(room) == frozenset()


def test_bad_init_arguments(env: tuple[KVManager, KVManager]) -> None:
    p, _d = env
    tx = KVSender(p, p.bootstrap_addr, next(_room_ids))
    with pytest.raises(ValueError, match="num_pages must be >= 0"):
        tx.init(-1)
    with pytest.raises(TypeError, match="num_pages must be an int"):
        tx.init(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="aux_index 8 out of range for 8 aux slots"):
        tx.init(2, aux_index=8)
    with pytest.raises(ValueError, match="required_dst_info_num"):
        KVSender(p, None, next(_room_ids), required_dst_info_num=0)


# -- tensors ---------------------------------------------------------------------------


def test_layer_tensors_of_mixed_dtype() -> None:
    with pytest.raises(ValueError, match=r"layer 1 is \(4, 8\) torch.float16"):
        KVPool([torch.zeros(4, 8), torch.zeros(4, 8, dtype=torch.float16)], torch.zeros(2, 2))


def test_layer_tensor_on_another_device() -> None:
    with pytest.raises(ValueError, match=r"layer 1 .* on meta"):
        KVPool([torch.zeros(4, 8), torch.zeros(4, 8, device="meta")], torch.zeros(2, 2))


def test_layer_tensor_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"layers must be \[num_pages, page_size=2, kv_heads=4, head_dim\]"):
        KVPool([torch.zeros(4, 2, 2, 8)], torch.zeros(2, 2), page_size=2, kv_heads=4)
    with pytest.raises(ValueError, match="layer 1: expected shape"):
        KVPool([torch.zeros(4, 8), torch.zeros(4, 8)[:0]], torch.zeros(2, 2))


def test_a_pool_that_is_not_a_pool(env: tuple[KVManager, KVManager]) -> None:
    with pytest.raises(TypeError, match="pool must be a KVPool"):
        KVManager("prefill", [torch.zeros(4, 8)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="role must be 'prefill' or 'decode'"):
        KVManager("middle", make_pool())


# -- calls in the wrong state ----------------------------------------------------------


def test_send_before_the_room_is_ready(env: tuple[KVManager, KVManager]) -> None:
    p, _ = env
    tx = KVSender(p, p.bootstrap_addr, next(_room_ids))
    with pytest.raises(
        RoomStateError, match=r"event 'send' is not allowed in state Bootstrapping: call init"
    ):
        tx.send([0])
    tx.init(1)
    with pytest.raises(RoomStateError, match="event 'send' is not allowed in state Bootstrapping"):
        tx.send([0])


def test_send_after_the_room_is_terminal(env: tuple[KVManager, KVManager]) -> None:
    tx, _rx = fresh(*env, pages=1)
    tx.send([0])
    assert wait(lambda: tx.poll() is KVPoll.Success)
    with pytest.raises(ValueError, match="exceed init"):
        tx.send([1])
    tx2, _ = fresh(*env, pages=2)
    tx2.abort()
    tx2.send([0, 1])  # Failed absorbs a racing send: no exception, nothing changes
    assert tx2.poll() is KVPoll.Failed


def test_poll_and_clear_after_clear(env: tuple[KVManager, KVManager]) -> None:
    tx, rx = fresh(*env, pages=1)
    tx.send([0])
    assert wait(lambda: rx.poll() is KVPoll.Success and tx.poll() is KVPoll.Success)
    tx.clear()
    rx.clear()
    for handle in (tx, rx):
        with pytest.raises(RoomStateError, match=r"event 'poll' .*: the room was cleared"):
            handle.poll()
        with pytest.raises(RoomStateError, match=r"event 'clear' .*: the room was cleared"):
            handle.clear()


def test_clear_before_a_terminal_state(env: tuple[KVManager, KVManager]) -> None:
    tx, _ = fresh(*env)
    with pytest.raises(RoomStateError, match="event 'clear' is not allowed in state WaitingForInput"):
        tx.clear()
    assert tx.poll() is KVPoll.WaitingForInput


def test_duplicate_room_id(env: tuple[KVManager, KVManager]) -> None:
    p, d = env
    with pytest.raises(DuplicateRoomError, match=r"room 100 \(sender\) already exists in state Transferring"):
        KVSender(p, p.bootstrap_addr, 100)
    with pytest.raises(DuplicateRoomError, match=r"room 100 \(receiver\)"):
        KVReceiver(d, p.bootstrap_addr, 100)


# -- the control plane ------------------------------------------------------------------


def raw_dealer(address: str) -> zmq.Socket[bytes]:
    ctx = zmq.Context.instance()
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{address}")
    return sock


def assert_alive_and_unchanged(p: KVManager, rooms_before: int) -> None:
    import time

    time.sleep(0.2)
    p.check_alive()
    assert len(p.table) == rooms_before and p.snapshot()["pending_infos"] == 0


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([MAGIC], id="truncated"),
        pytest.param([MAGIC, b'{"type":"room","room":1'], id="truncated-json"),
        pytest.param([b"\x00\xff garbage", b"\x01\x02"], id="garbage"),
        pytest.param([b"KVR\x01", b'{"type":"ping"}'], id="wrong-version"),
        pytest.param([MAGIC, b'{"type":"hello"}', b"x" * 100], id="missing-fields"),
        pytest.param([MAGIC, b"{}", b"", b"", b""], id="too-many-frames"),
        pytest.param([MAGIC, b"{}", b"\0" * (FAST.max_message_bytes + 1)], id="oversized"),
    ],
)
def test_bad_control_frames_are_dropped(env: tuple[KVManager, KVManager], frames: list[bytes]) -> None:
    p, _ = env
    before = len(p.table)
    sock = raw_dealer(p.bootstrap_addr)
    try:
        sock.send_multipart(frames)
        assert_alive_and_unchanged(p, before)
    finally:
        sock.close()


def test_room_traffic_before_the_handshake_is_ignored(env: tuple[KVManager, KVManager]) -> None:
    p, _ = env
    before = len(p.table)
    sock = raw_dealer(p.bootstrap_addr)
    fields = {
        "room": 555,
        "aux_index": None,
        "prefix_pages": 0,
        "npages": 1,
        "staging": None,
        "chunk_pages": 16,
    }
    try:
        sock.send_multipart(encode("room", fields, b"\0" * 8))
        sock.send_multipart(encode("abort", {"room": 100, "reason": "forged"}))
        sock.send_multipart(encode("ready", {"room": 100}))
        sock.send_multipart(encode("commit", {"room": 100}))
        assert_alive_and_unchanged(p, before)
        assert p.table.get(555) is None
    finally:
        sock.close()


def test_unknown_room_in_control_messages_creates_nothing(env: tuple[KVManager, KVManager]) -> None:
    p, d = env
    peer = d.side.peers[p.bootstrap_addr]

    def forge() -> None:
        peer.client.send("abort", {"room": 777, "reason": "no such room"})
        peer.client.send("ready", {"room": 778})
        peer.client.send("commit", {"room": 779})

    d.submit(forge)
    assert wait(lambda: p.side.tombstones.get(777) is not None)
    assert p.table.get(777) is None and p.table.get(778) is None and d.table.get(777) is None
    assert p.table.get(779) is None
    assert p.footprint(777) == p.footprint(778) == p.footprint(779) == frozenset()


def test_tombstones_of_unknown_room_aborts_are_bounded_by_count() -> None:
    """Hostile traffic: aborts of rooms that never existed leave at most pending_limit tombstones."""
    config = dataclasses.replace(FAST, pending_limit=8)
    with (
        KVManager("prefill", make_pool(), config=config, audit=False) as p,
        KVManager("decode", make_pool(), config=config, audit=False) as d,
    ):
        tx, rx = ready_pair(p, d, 1, pages=2)  # completes the handshake
        peer = d.side.peers[p.bootstrap_addr]

        def forge() -> None:
            for room in range(5000, 5050):
                peer.client.send("abort", {"room": room, "reason": "hostile"})

        d.submit(forge)
        assert wait(lambda: p.side.tombstones.get(5049) is not None)
        assert len(p.side.tombstones) == p.snapshot()["tombstones"] == 8
        assert list(p.side.tombstones) == list(range(5042, 5050))  # the oldest went first
        tx.send([0, 1])
        assert wait(lambda: tx.poll() is KVPoll.Success and rx.poll() is KVPoll.Success)


# -- peers ---------------------------------------------------------------------------------


def test_peer_with_an_incompatible_layout(env: tuple[KVManager, KVManager]) -> None:
    p, _ = env
    odd = KVManager("decode", make_pool(layers=3), config=FAST, audit=False)
    try:
        rx = KVReceiver(odd, p.bootstrap_addr, next(_room_ids))
        rx.init()
        rx.send_metadata([0])
        assert wait(lambda: rx.poll() is KVPoll.Failed)
        with pytest.raises(IncompatiblePeerError, match="layers: ours 2, theirs 3"):
            rx.failure_exception()
        assert odd.footprint(rx.bootstrap_room) == frozenset()
    finally:
        odd.close()


def test_a_bootstrap_address_that_does_not_answer(env: tuple[KVManager, KVManager]) -> None:
    _, d = env
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rx = KVReceiver(d, f"127.0.0.1:{port}", next(_room_ids))
    rx.init()
    rx.send_metadata([5])
    assert wait(lambda: rx.poll() is KVPoll.Failed, timeout=FAST.heartbeat_timeout + 3)
    with pytest.raises(PeerLostError, match="did not answer"):
        rx.failure_exception()


def test_a_malformed_bootstrap_address(env: tuple[KVManager, KVManager]) -> None:
    _, d = env
    for bad in ("no-port", "host:notaport", ":1", "127.0.0.1:70000", 42):
        with pytest.raises(ValueError, match="bootstrap address"):
            KVReceiver(d, bad, next(_room_ids))  # type: ignore[arg-type]


def test_a_port_already_in_use(env: tuple[KVManager, KVManager]) -> None:
    p, _ = env
    port = int(p.bootstrap_addr.rsplit(":", 1)[1])
    expected = rf"cannot listen on 127\.0\.0\.1:{port}: Address already in use"
    with pytest.raises(BootstrapError, match=expected):
        KVManager("prefill", make_pool(), bootstrap_port=port, audit=False)


# -- fuzzing a live manager ----------------------------------------------------------------


frame = st.binary(max_size=256)
message = st.lists(frame, min_size=1, max_size=4) | st.lists(
    st.sampled_from([MAGIC, b"KVR\x02"]).flatmap(lambda m: st.tuples(st.just(m), frame)).map(list), max_size=1
).map(lambda xs: xs[0] if xs else [MAGIC])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(message, min_size=1, max_size=5))
def test_fuzzed_frames_never_crash_the_manager_or_create_a_room(
    managers: tuple[KVManager, KVManager], batch: list[list[bytes]]
) -> None:
    p, _ = managers
    before = set(p.table._rooms)
    sock = raw_dealer(p.bootstrap_addr)
    try:
        for frames in batch:
            sock.send_multipart(frames)
        # a ping after the garbage: the manager must still be reading, and still alive
        sock.send_multipart(encode("ping"))
        import time

        time.sleep(0.02)
        p.check_alive()
        # no room appears (earlier tests' rooms may expire meanwhile: that is their deadline)
        assert set(p.table._rooms) <= before and p.snapshot()["pending_infos"] == 0
    finally:
        sock.close()


def test_control_plane_binds_only_the_configured_host(env: tuple[KVManager, KVManager]) -> None:
    p, _ = env
    endpoint = p.side.server.socket.getsockopt(zmq.LAST_ENDPOINT).decode()
    assert endpoint.startswith("tcp://127.0.0.1:"), endpoint  # loopback by default, never 0.0.0.0
    assert p.bootstrap_addr == endpoint.removeprefix("tcp://")
