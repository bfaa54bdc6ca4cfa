"""Request fingerprints: a room's KV reaches only the request it was prefilled for.

Unit checks of :func:`kvroom.request_fingerprint`, and both managers in one process (real NIXL,
real ZMQ): a decode page list naming another request than the one prefill holds under the room
id fails the room on both sides before any byte moves, whichever of the two came first.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from kvroom import (
    KVManager,
    KVPoll,
    KVReceiver,
    KVSender,
    ManagerConfig,
    RemoteFailureError,
    RequestMismatchError,
    request_fingerprint,
)
from kvroom.fsm import Deadlines
from tests.test_api import managers, wait

# long deadlines: a room that fails here failed on the mismatch, not on a deadline
SLOW = ManagerConfig(heartbeat_interval=0.1, heartbeat_timeout=5.0, deadlines=Deadlines(30.0, 30.0, 30.0))
SOON = SLOW.deadlines.bootstrapping / 4  # "at once", with the slack a loaded machine needs


@pytest.fixture
def pair() -> Iterator[tuple[KVManager, KVManager]]:
    yield from managers(SLOW)


def test_the_fingerprint_is_the_token_count_and_a_digest_of_the_ids() -> None:
    a = request_fingerprint([5, 6, 7])
    assert a == request_fingerprint((5, 6, 7)) == request_fingerprint(iter([5, 6, 7]))
    assert a.startswith("3:") and len(a) == 2 + 32
    assert request_fingerprint([5, 7, 6]) != a  # order matters
    assert request_fingerprint([5, 6]) != a
    assert request_fingerprint([]) == request_fingerprint(()) != request_fingerprint([0])
    assert request_fingerprint([2**40, -1]) != request_fingerprint([2**40, -2])


@pytest.mark.parametrize("bad", [b"abc", 5, ""])
def test_a_bad_fingerprint_is_refused_at_the_call(pair: tuple[KVManager, KVManager], bad: object) -> None:
    p, d = pair
    error = ValueError if bad == "" else TypeError
    with pytest.raises(error, match="fingerprint"):
        KVSender(p, None, 9, fingerprint=bad)  # type: ignore[arg-type]
    rx = KVReceiver(d, p.bootstrap_addr, 9)
    rx.init()
    with pytest.raises(error, match="fingerprint"):
        rx.send_metadata([1], None, fingerprint=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1 to 128"):
        rx.send_metadata([1], None, fingerprint="x" * 129)
    assert p.footprint(9) == frozenset()


def _fill(p: KVManager) -> None:
    for layer in p.pool.layers:
        layer.copy_(torch.randint(0, 255, layer.shape, dtype=torch.uint8))


def _both_fail_at_once(tx: KVSender, rx: KVReceiver, d: KVManager, started: float) -> None:
    assert wait(lambda: tx.poll() is KVPoll.Failed and rx.poll() is KVPoll.Failed, SOON), (
        tx.poll(),
        rx.poll(),
    )
    assert time.monotonic() - started < SOON
    with pytest.raises(RequestMismatchError, match=r"room \d+: decode .* expects request 3:"):
        tx.failure_exception()
    with pytest.raises(RemoteFailureError, match="expects request"):
        rx.failure_exception()
    assert torch.count_nonzero(d.pool.layers[0]) == 0  # not one byte of the other request landed


@pytest.mark.parametrize("first", ["decode", "prefill"])
def test_a_decode_page_list_for_another_request_fails_the_room_on_both_sides(
    pair: tuple[KVManager, KVManager], first: str
) -> None:
    p, d = pair
    _fill(p)
    started = time.monotonic()
    rx = KVReceiver(d, p.bootstrap_addr, 21)
    rx.init()
    if first == "prefill":
        tx = KVSender(p, None, 21, fingerprint=request_fingerprint([1, 2, 3]))
    rx.send_metadata([10, 11], None, fingerprint=request_fingerprint([1, 2, 4]))
    if first == "decode":
        assert wait(lambda: p.side.pending.get(21) is not None)
        tx = KVSender(p, None, 21, fingerprint=request_fingerprint([1, 2, 3]))
    _both_fail_at_once(tx, rx, d, started)
    assert p.footprint(21) == d.footprint(21) == frozenset()


def test_the_mismatch_fails_the_room_even_after_init(pair: tuple[KVManager, KVManager]) -> None:
    p, d = pair
    _fill(p)
    started = time.monotonic()
    tx = KVSender(p, None, 22, fingerprint=request_fingerprint([7] * 3))
    tx.init(2)
    rx = KVReceiver(d, p.bootstrap_addr, 22)
    rx.init()
    rx.send_metadata([10, 11], None, fingerprint=request_fingerprint([8] * 3))
    _both_fail_at_once(tx, rx, d, started)


def test_equal_fingerprints_or_one_side_without_serve_the_room(pair: tuple[KVManager, KVManager]) -> None:
    p, d = pair
    _fill(p)
    same = request_fingerprint(range(300))
    for room, (mine, theirs) in enumerate([(same, same), (same, None), (None, same), (None, None)], 30):
        tx = KVSender(p, None, room, fingerprint=mine)
        rx = KVReceiver(d, p.bootstrap_addr, room)
        rx.init()
        rx.send_metadata([room - 20, room], None, fingerprint=theirs)
        assert wait(lambda tx=tx: tx.poll() is KVPoll.WaitingForInput)
        tx.init(2)
        tx.send([0, 1])
        assert wait(lambda tx=tx, rx=rx: tx.poll() is KVPoll.Success and rx.poll() is KVPoll.Success)
        assert torch.equal(d.pool.layers[1][[room - 20, room]], p.pool.layers[1][:2])
        tx.clear()
        rx.clear()
