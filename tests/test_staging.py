"""The staging ring, its store, and staging that never leaks (real NIXL, in one process)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvroom import KVManager, KVPoll, KVReceiver, KVSender, ManagerConfig
from kvroom.fsm import Deadlines, Event, Role, RoomTable
from kvroom.transport.staging import Reservation, StagingRing, StagingStore
from tests.ranks import PAGE_SIZE, SRC_AUX, holds, make_pool
from tests.test_api import wait

# -- the ring ------------------------------------------------------------------


def test_ring_reserves_contiguous_space_next_fit_and_merges_frees() -> None:
    ring = StagingRing(10)
    a, b, c = ring.alloc(4), ring.alloc(4), ring.alloc(2)
    assert (a, b, c) == (Reservation(0, 4), Reservation(4, 4), Reservation(8, 2))
    assert ring.alloc(1) is None and ring.free == 0
    ring.release(a)
    ring.release(c)
    assert ring.largest_free() == 4 and ring.alloc(5) is None
    ring.release(b)
    assert ring.free == 10 and ring.largest_free() == 10
    assert ring.alloc(10) == Reservation(0, 10)


def test_ring_refuses_double_release_and_bad_sizes() -> None:
    ring = StagingRing(8)
    res = ring.alloc(3)
    assert res is not None
    ring.release(res)
    with pytest.raises(RuntimeError, match="released twice"):
        ring.release(res)
    with pytest.raises(ValueError, match="positive"):
        ring.alloc(0)
    with pytest.raises(ValueError, match="capacity"):
        StagingRing(-1)
    assert StagingRing(0).alloc(1) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 12)), max_size=60))
def test_ring_never_overlaps_and_always_returns_to_full(ops: list[tuple[bool, int]]) -> None:
    ring = StagingRing(40)
    held: list[Reservation] = []
    for is_alloc, size in ops:
        if is_alloc or not held:
            res = ring.alloc(size)
            if res is not None:
                held.append(res)
        else:
            ring.release(held.pop(size % len(held)))
        spans = sorted((r.offset, r.offset + r.units) for r in held)
        assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))
        assert all(0 <= lo < hi <= 40 for lo, hi in spans)
        assert ring.used == sum(r.units for r in held) and ring.free == 40 - ring.used
    for res in held:
        ring.release(res)
    assert ring.free == 40 and ring.largest_free() == 40


def test_store_gives_space_back_on_pop_and_on_room_cleanup() -> None:
    ring = StagingRing(16)
    store = StagingStore("prefetch_requested", ring)
    table = RoomTable(Role.RECEIVER, staging=store)
    r1, r2 = table.create(1, 0.0), table.create(2, 0.0)
    for room in (r1, r2):
        for chunk in range(2):
            res = ring.alloc(4)
            assert res is not None and store.put(room, (room.id, chunk, "p0"), res)
    assert ring.free == 0
    store.pop(r1, (1, 0, "p0"))
    assert ring.free == 4

    table.fire(r2, Event.ABORT, 1.0)
    assert ring.free == 12 and table.footprint(2) == frozenset()
    assert store.keys_of(1) == {(1, 1, "p0")}  # the other room is untouched


# -- staging with managers ------------------------------------------------------

ADDRS_2 = ["127.0.0.1:1", "127.0.0.1:2"]  # prefetch only computes needs from addresses


def config(**extra: object) -> ManagerConfig:
    base: dict[str, object] = {
        "heartbeat_interval": 0.1,
        "heartbeat_timeout": 2.0,
        "staging_chunk_pages": 2,
        "deadlines": Deadlines(5.0, 10.0, 5.0),
    }
    return ManagerConfig(**{**base, **extra})  # type: ignore[arg-type]


@pytest.fixture
def tp2_to_1() -> Iterator[tuple[list[KVManager], KVManager]]:
    """Prefill TP 2, decode TP 1 with pages of 2 tokens: head slices interleave, so staging."""
    from tests.ranks import fill

    prefill = [KVManager("prefill", make_pool(r, 2), config=config(), audit=False) for r in range(2)]
    for p in prefill:
        fill(p.pool)
    decode = KVManager("decode", make_pool(0, 1, staging_pages=256), config=config(), audit=False)
    yield prefill, decode
    for m in [*prefill, decode]:
        m.close()


def ready_senders(prefill: list[KVManager], room: int, pages: int, aux: int | None = None) -> list[KVSender]:
    """One sender per prefill rank, each waited into WaitingForInput and given init()."""
    senders = [KVSender(p, None, room) for p in prefill]
    for tx in senders:
        assert wait(lambda tx=tx: tx.poll() is KVPoll.WaitingForInput)  # type: ignore[misc]
        tx.init(pages, aux_index=aux)
    return senders


def ring_of(decode: KVManager) -> StagingRing:
    ring: StagingRing = decode.side.ring
    return ring


def test_a_hundred_rooms_failing_while_holding_staging_leave_the_whole_ring(
    tp2_to_1: tuple[list[KVManager], KVManager],
) -> None:
    prefill, decode = tp2_to_1
    ring = ring_of(decode)
    addrs = [p.bootstrap_addr for p in prefill]
    pages = 2  # 2 pages x 2 heads x 2 layers x 2 sources = 16 units a room; the ring holds 2048
    rxs, txs = [], []
    for room in range(100):
        assert decode.prefetch_staging(room, addrs, pages)
        rx = KVReceiver(decode, addrs, room)
        rxs.append(rx)
        if room % 4:  # a quarter fail while only prefetched; the rest hold staging for a sent page list
            rx.init()
            rx.send_metadata([2 * room % 64, (2 * room + 1) % 64])
    assert ring.used == 100 * 16
    for room in range(100):
        if room % 4:
            txs.append((room, ready_senders(prefill, room, pages)))
    for room, senders in txs:
        if room % 4 == 2:
            senders[0].send([0])  # mid-transfer on one rank
    for room, rx in enumerate(rxs):
        if room % 4 == 3:
            txs[[r for r, _ in txs].index(room)][1][1].abort()  # prefill rank 1 gives up
        else:
            rx.abort()  # decode gives up (room % 4 == 2: mid-transfer)
    assert wait(lambda: all(rx.poll() is KVPoll.Failed for rx in rxs))
    assert wait(lambda: all(tx.poll() is KVPoll.Failed for _, senders in txs for tx in senders))
    assert ring.free == ring.capacity, "failed rooms pinned staging space"
    for room in range(100):
        assert decode.footprint(room) == frozenset()
        assert all(p.footprint(room) == frozenset() for p in prefill)
    # the ring is not wedged: a new room stages and lands byte for byte
    rx = KVReceiver(decode, addrs, 1000)
    rx.init()
    rx.send_metadata([60, 61, 62], aux_index=1)
    senders = ready_senders(prefill, 1000, 3, aux=SRC_AUX)
    for tx in senders:
        tx.send([5, 9, 10])
    assert wait(lambda: rx.poll() is KVPoll.Success and all(t.poll() is KVPoll.Success for t in senders))
    assert holds(decode.pool, [60, 61, 62], [5, 9, 10])
    assert ring.free == ring.capacity


def test_prefetch_before_the_room_exists_is_adopted_or_expires(
    tp2_to_1: tuple[list[KVManager], KVManager],
) -> None:
    prefill, decode = tp2_to_1
    ring = ring_of(decode)
    addrs = [p.bootstrap_addr for p in prefill]
    assert decode.prefetch_staging(7, addrs, 3)  # room 7 is not registered yet
    held = ring.used
    assert held == 2 * 2 * 3 * 2 and decode.snapshot()["early_prefetches"] == 1
    rx = KVReceiver(decode, addrs, 7)
    assert {"prefetch_requested", "prefetched_rooms"} <= decode.footprint(7)
    assert decode.side.prefetched.get(7) == 3  # the page count it was prefetched for
    assert decode.snapshot()["early_prefetches"] == 0 and ring.used == held
    rx.init()
    rx.send_metadata([1, 2, 3])
    for tx in ready_senders(prefill, 7, 3):
        tx.send([4, 5, 6])
    assert wait(lambda: rx.poll() is KVPoll.Success)
    assert holds(decode.pool, [1, 2, 3], [4, 5, 6])
    assert ring.used == 0  # every chunk's space returned once scattered
    rx.clear()
    assert decode.footprint(7) == frozenset()


def test_an_unclaimed_early_prefetch_is_freed_after_its_ttl() -> None:
    decode = KVManager(
        "decode", make_pool(0, 1, staging_pages=8), config=config(pending_ttl=0.3), audit=False
    )
    try:
        assert decode.prefetch_staging(9, ADDRS_2, 2)
        assert ring_of(decode).used > 0
        assert wait(lambda: ring_of(decode).used == 0, timeout=5)
        assert decode.snapshot()["early_prefetches"] == 0
        assert not decode.prefetch_staging(10, ADDRS_2, 64), "more than the ring holds must be refused"
        assert ring_of(decode).used == 0
    finally:
        decode.close()


def test_a_room_too_big_for_the_ring_fails_with_a_clear_error(
    tp2_to_1: tuple[list[KVManager], KVManager],
) -> None:
    prefill, _ = tp2_to_1
    decode = KVManager("decode", make_pool(0, 1, staging_pages=64), config=config(), audit=False)
    rx = KVReceiver(decode, [p.bootstrap_addr for p in prefill], 3)
    rx.init()
    rx.send_metadata(np.arange(64))  # 64 pages x 4 heads x 2 layers = 512 units: all of the ring
    rx2 = KVReceiver(decode, [p.bootstrap_addr for p in prefill], 4)
    rx2.init()
    rx2.send_metadata(np.arange(64))  # waits for space: room 3 holds all of it
    time.sleep(0.3)
    assert rx2.poll() is KVPoll.Bootstrapping
    rx.abort()
    assert wait(lambda: rx2.poll() is KVPoll.WaitingForInput), "a waiting room must get the freed space"
    rx2.abort()
    assert wait(lambda: ring_of(decode).free == 512)
    decode.close()
    small = KVManager("decode", make_pool(0, 1, staging_pages=1), config=config(), audit=False)
    try:
        rx3 = KVReceiver(small, [p.bootstrap_addr for p in prefill], 5)
        rx3.init()
        rx3.send_metadata([0, 1])
        assert wait(lambda: rx3.poll() is KVPoll.Failed)
        from kvroom import StagingExhaustedError

        with pytest.raises(StagingExhaustedError, match="needs 16 staging units, the ring holds 8"):
            rx3.failure_exception()
    finally:
        small.close()


def test_concurrent_prefetch_and_failure_leave_other_rooms_staging_untouched() -> None:
    decode = KVManager("decode", make_pool(0, 1, staging_pages=2048), config=config(), audit=False)
    ring, store = ring_of(decode), decode.side.staging
    try:
        keep = [KVReceiver(decode, ADDRS_2, room) for room in range(50)]
        doomed = [KVReceiver(decode, ADDRS_2, room) for room in range(50, 100)]
        for rx in keep + doomed:
            assert decode.prefetch_staging(rx.bootstrap_room, ADDRS_2, 4)
        before = {
            rx.bootstrap_room: {k: store.get(k) for k in store.keys_of(rx.bootstrap_room)} for rx in keep
        }
        racing = [KVReceiver(decode, ADDRS_2, room) for room in range(200, 300)]
        errors: list[BaseException] = []

        def prefetcher() -> None:
            try:
                for room in [*range(100, 200), *range(200, 300)]:  # new rooms, then rooms being failed
                    decode.prefetch_staging(room, ADDRS_2, 4)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        def failer() -> None:
            try:
                for rx in doomed + racing:
                    decode.fire(rx.room, Event.ABORT, reason="test")
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=prefetcher), threading.Thread(target=failer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        after = {
            rx.bootstrap_room: {k: store.get(k) for k in store.keys_of(rx.bootstrap_room)} for rx in keep
        }
        assert after == before, "another room's staging changed"
        for rx in doomed + racing:
            assert rx.poll() is KVPoll.Failed and decode.footprint(rx.bootstrap_room) == frozenset()
        early = decode.side._early
        held = sum(r.units for room in range(300) for k in store.keys_of(room) if (r := store.get(k)))
        held += sum(r.units for entry in early.values() for r in entry[0].values())
        assert ring.used == held, "space is held by nobody (leaked) or by two"
        # a prefetch for a room that is not live (never created, or already failed) is held for
        # pending_ttl like any early request; the failed rooms themselves hold nothing
        assert set(range(100, 200)) <= set(early) <= set(range(100, 300))
    finally:
        decode.close()


def test_decode_without_staging_refuses_peers_that_need_it() -> None:
    from kvroom import IncompatiblePeerError

    prefill = [KVManager("prefill", make_pool(r, 2), config=config(), audit=False) for r in range(2)]
    decode = KVManager("decode", make_pool(0, 1), config=config(), audit=False)
    try:
        rx = KVReceiver(decode, [p.bootstrap_addr for p in prefill], 1)
        rx.init()
        rx.send_metadata([0])
        assert wait(lambda: rx.poll() is KVPoll.Failed)
        with pytest.raises(IncompatiblePeerError, match="staging_pages=0"):
            rx.failure_exception()
    finally:
        for m in [*prefill, decode]:
            m.close()


def test_receiver_rejects_bad_address_lists() -> None:
    decode = KVManager("decode", make_pool(0, 1), config=config(), audit=False)
    try:
        for bad, match in (
            ([], "non-empty"),
            (["127.0.0.1:1", "127.0.0.1:1"], "duplicate"),
            (["x"], "host:port"),
        ):
            with pytest.raises(ValueError, match=match):
                KVReceiver(decode, bad, 1)
        with pytest.raises(ValueError, match="do not split over 3"):
            decode.prefetch_staging(1, ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], 1)
        assert len(decode.table) == 0
    finally:
        decode.close()


assert PAGE_SIZE == 2  # the staging cases above rely on pages of 2 tokens
