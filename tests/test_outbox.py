"""Prefill's outbox: a worker turn's WRITEs joined per decode agent and memory-kind pair."""

from __future__ import annotations

import numpy as np
import pytest

from kvroom.node.outbox import Batch, Outbox
from kvroom.node.shares import ChunkWrite, deferred_writes, direct_writes
from kvroom.planning import PairRoute, align_chunk, assign, for_source, route
from tests.test_planning import ITEMS_DST, ITEMS_SRC, bound, mha, ranks


def _rows(addr: int, n: int = 1, size: int = 64) -> np.ndarray:
    return np.array([[addr + i * size, size, 0] for i in range(n)], dtype=np.uint64)


def _write(addr: int, n: int = 1, mem: str = "DRAM") -> ChunkWrite:
    return ChunkWrite(_rows(addr, n), mem, _rows(addr + (1 << 30), n), mem, 0, n)


def _route() -> PairRoute:
    model = mha()
    src, dst = ranks(model, 1)[0], ranks(model, 1)[0]
    return route(bound(src, ITEMS_SRC, 1 << 40), bound(dst), for_source(assign(dst, [src]), 0))


def test_writes_join_per_agent_and_memory_kinds_and_take_empties_the_outbox() -> None:
    box = Outbox()
    for room, (agent, mem) in enumerate([("a", "DRAM"), ("b", "DRAM"), ("a", "DRAM"), ("a", "VRAM")]):
        assert box.add(agent, _write(room << 12, mem=mem), f"n{room}".encode(), room, True) is None
    assert len(box) == 4
    batches = {(b.agent, b.local_mem): b for b in box.take()}
    assert len(box) == 0 and box.take() == []
    joined = batches[("a", "DRAM")]
    assert joined.rooms == ((0, True), (2, True)) and joined.notif == b"n0;n2" and joined.nbytes == 128
    local, remote = joined.rows()
    assert local.tolist() == [[0, 64, 0], [2 << 12, 64, 0]] and remote[:, 0].tolist() == [
        1 << 30,
        (1 << 30) + (2 << 12),
    ]
    assert batches[("b", "DRAM")].rooms == ((1, True),) and batches[("a", "VRAM")].rooms == ((3, True),)


@pytest.mark.parametrize(
    ("max_bytes", "max_writes", "full_after"), [(1 << 20, 3, 3), (192, 64, 3), (64, 64, 1)]
)
def test_a_full_batch_is_handed_back_to_post_at_once(
    max_bytes: int, max_writes: int, full_after: int
) -> None:
    box = Outbox(max_bytes, max_writes)
    for i in range(full_after - 1):
        assert box.add("a", _write(i << 12), b"n", i, False) is None
    full = box.add("a", _write(99 << 12), b"n", 99, False)
    assert full is not None and len(full.entries) == full_after and len(box) == 0


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Outbox(0, 1)


def test_a_lost_agent_takes_its_waiting_writes_with_it() -> None:
    box = Outbox()
    box.add("a", _write(0), b"n", 1, False)
    box.add("a", _write(0, mem="VRAM"), b"n", 1, False)
    box.add("b", _write(0), b"n", 2, False)
    assert box.drop("a") == 2 and [b.agent for b in box.take()] == ["b"]


def test_rooms_that_failed_meanwhile_are_left_out() -> None:
    box = Outbox()
    for room in range(4):
        box.add("a", _write(room << 12), f"n{room}".encode(), room, room == 3)
    (batch,) = box.take()
    kept = batch.keep(lambda room: room % 2 == 1)
    assert kept.rooms == ((1, False), (3, True)) and kept.nbytes == 128 and kept.notif == b"n1;n3"
    assert batch.keep(lambda room: True) is batch


def test_deferred_chunks_plan_joined_to_what_each_plans_alone() -> None:
    """Chunks of several rooms, queued unplanned, give the rows planning each would give."""
    pair = _route()
    box = Outbox()
    want_local, want_remote = [], []
    chunks = [([0, 1, 2], [5, 6, 7]), ([3], [0]), ([8, 9], [1, 2])]
    for room, (src, dst) in enumerate(chunks):
        indices = align_chunk(np.array(src), 0, np.array(dst), 0)
        (deferred,) = deferred_writes(pair, indices) or []
        (alone,) = direct_writes(pair, indices)
        want_local.append(alone.local)
        want_remote.append(alone.remote)
        assert deferred.nbytes == int(alone.local[:, 1].sum()) and deferred.npages == len(src)
        box.add("a", deferred, b"n", room, True)
    (batch,) = box.take()
    local, remote = batch.rows()
    pairs = {(int(a), int(b), int(n)) for (a, n, _), (b, _, _) in zip(local, remote, strict=True)}
    want = np.concatenate(want_local), np.concatenate(want_remote)
    assert pairs == {(int(a), int(b), int(n)) for (a, n, _), (b, _, _) in zip(*want, strict=True)}
    assert int(local[:, 1].sum()) == batch.nbytes


def test_a_bad_index_fails_only_the_rooms_whose_chunks_hold_it() -> None:
    pair = _route()
    box = Outbox()
    for room, dst in enumerate([[1, 2], [7, ITEMS_DST["kv"] + 5], [3, 4]]):
        indices = align_chunk(np.array([room * 2, room * 2 + 1]), 0, np.array(dst), 0)
        (deferred,) = deferred_writes(pair, indices) or []
        box.add("a", deferred, b"n", room, False)
    good_chunk = align_chunk(np.array([9]), 2, np.array([7, 8, 6]), 0)  # room 1's next chunk plans fine
    (deferred,) = deferred_writes(pair, good_chunk) or []
    box.add("a", deferred, b"n", 1, True)
    (batch,) = box.take()
    with pytest.raises(ValueError, match="outside region"):
        batch.rows()
    good, bad = batch.split()
    assert [room for room, _ in bad] == [1] and "destination index 14" in str(bad[0][1])
    # room 1 fails, so its chunk that would plan is left out too: nothing of it is posted
    assert good.rooms == ((0, False), (2, False)) and isinstance(good, Batch)
    assert good.rows()[0].shape[0] > 0


def test_nothing_to_move_is_no_write() -> None:
    pair = _route()
    assert deferred_writes(pair, align_chunk(np.array([1, 2]), 0, np.array([3, 4]), 2)) == []


def test_descriptor_rows_cap_a_batch_so_per_token_rows_do_not_pile_up() -> None:
    box = Outbox(max_rows=10)
    assert box.add("a", _write(0, n=4), b"n", 1, False) is None
    assert box.add("a", _write(1 << 12, n=4), b"n", 2, False) is None
    full = box.add("a", _write(2 << 12, n=4), b"n", 3, False)  # 12 rows would pass 10: post the 8 first
    assert full is not None and full.rooms == ((1, False), (2, False)) and full.nrows == 8
    assert box.add("a", _write(3 << 12, n=6), b"n", 4, False) is not None  # 4 + 6 reaches the cap
    assert len(box) == 0


def test_a_deferred_write_bounds_its_rows_from_the_route() -> None:
    pair = _route()
    indices = align_chunk(np.array([0, 1, 2, 5]), 0, np.array([3, 4, 5, 8]), 0)
    (deferred,) = deferred_writes(pair, indices) or []
    (alone,) = direct_writes(pair, indices)
    assert deferred.rows >= alone.local.shape[0] and deferred.rows == pair.max_rows(indices)
