"""The layouts beyond MHA through SGLang's calls, each prefill rank and the decode a process of its own.

* MLA, prefill TP 2 -> decode TP 1: the latent is identical on both prefill ranks, so exactly one
  of them writes (the other only takes part in the verdict); bytes identical, aux row landed.
* A hybrid mamba model, prefill TP 2 -> decode TP 1: SGLang's ``send(kv_indices, state_indices)``
  and ``send_metadata(..., state_indices)``; each rank's conv (q, k, v groups) and temporal state
  slices land in decode's whole rows.  An aborted room's state rows are covered by the Failed
  cleanup on both sides.
* Pipeline-parallel prefill, 2 stages -> decode PP 1: each stage writes its layers at their
  offset in decode's layer list; only the last stage holds the aux row; the room completes
  only when both stages delivered.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("sglang")

from tests.integrations.sglang.cluster import Cluster, call_all
from tests.integrations.sglang.node import PAGE_SIZE, TERMINAL

pytestmark = pytest.mark.slow

SRC, DST = [3, 4, 5, 9, 10, 1, 2], [30, 31, 7, 8, 40, 41, 42]


def cluster_of(family: str, **shape: int) -> Iterator[Cluster]:
    cluster = Cluster(family=family, **shape)
    try:
        yield cluster
    finally:
        cluster.close()


def transfer(cluster: Cluster, room: int, aux: int, slots: tuple[int, int] | None = None) -> None:
    """One request of ``len(SRC)`` pages in two chunks through SGLang's calls, to Success everywhere."""
    prefill, decode, addr = cluster.prefill, cluster.decodes[0][0], cluster.addr
    decode.call("receiver", room, addr, DST, aux, 0, slots[1] if slots else None)
    for node in prefill:
        node.call("sender", room)
    waiting = call_all(prefill, "wait", [room], ["WaitingForInput"], 30)  # collective per gloo group
    assert waiting == [{room: "WaitingForInput"}] * len(prefill)
    for node in prefill:
        node.call("begin", room, len(SRC) * PAGE_SIZE, aux)
        node.call("chunk", room, SRC[:3], False)
        node.call("chunk", room, SRC[3:], True, slots[0] if slots else None)
    assert call_all(prefill, "wait", [room], list(TERMINAL), 30) == [{room: "Success"}] * len(prefill)
    assert decode.call("wait", [room], list(TERMINAL), 30) == {room: "Success"}


def assert_cleared(cluster: Cluster, room: int) -> None:
    for node in [*cluster.prefill, cluster.decodes[0][0]]:
        node.call("clear", room, times=2)
        assert node.call("footprint", room) == [], node.name
        assert node.call("live_rooms") == 0, node.name


@pytest.fixture(scope="module")
def mla() -> Iterator[Cluster]:
    yield from cluster_of("mla", prefill_tp=2)


def test_mla_prefill_tp2_to_decode_tp1_has_exactly_one_writer(mla: Cluster) -> None:
    transfer(mla, 21, aux=3)
    decode = mla.decodes[0][0]
    assert decode.call("holds", DST, SRC)
    assert decode.call("aux", 3) == (21, 21 % 1000 + 1)
    posted = [node.call("posted", 21) for node in mla.prefill]
    assert sorted(posted)[0] == 0 and sorted(posted)[1] > 0, posted  # one writer, one voter
    assert_cleared(mla, 21)


@pytest.fixture(scope="module")
def hybrid() -> Iterator[Cluster]:
    yield from cluster_of("hybrid", prefill_tp=2)


def test_hybrid_state_rows_land_with_the_last_chunk_from_every_tp_slice(hybrid: Cluster) -> None:
    decode = hybrid.decodes[0][0]
    assert decode.call("state_zero", 5)
    transfer(hybrid, 31, aux=2, slots=(1, 5))
    assert decode.call("holds", DST, SRC)
    assert decode.call("state_holds", 5, 1) == []  # conv (q, k, v) and temporal rows of both ranks
    assert decode.call("aux", 2) == (31, 31 % 1000 + 1)
    assert decode.call("state_zero", 4)  # no other row written
    assert_cleared(hybrid, 31)


def test_an_aborted_hybrid_room_leaves_no_state_behind(hybrid: Cluster) -> None:
    prefill, decode, addr = hybrid.prefill, hybrid.decodes[0][0], hybrid.addr
    decode.call("receiver", 32, addr, DST, 4, 0, 3)  # state rows announced with the page list
    for node in prefill:
        node.call("sender", 32)
    assert call_all(prefill, "wait", [32], ["WaitingForInput"], 30) == [{32: "WaitingForInput"}] * 2
    for node in prefill:
        node.call("begin", 32, len(SRC) * PAGE_SIZE, 4)
        node.call("chunk", 32, SRC[:3], False)
    decode.call("abort", 32)
    for node in prefill:
        node.call("chunk", 32, SRC[3:], True, 2)  # the last chunk, with state, races the abort
    assert call_all(prefill, "wait", [32], list(TERMINAL), 30) == [{32: "Failed"}] * 2
    assert decode.call("wait", [32], list(TERMINAL), 30) == {32: "Failed"}
    for node in [*prefill, decode]:
        assert node.call("footprint", 32) == [], node.name  # before failure_exception()
        failure = node.call("failure", 32)
        assert failure["type"] == "KVTransferError", failure
    assert decode.call("release_safe", 32)
    assert_cleared(hybrid, 32)


@pytest.fixture(scope="module")
def pipeline() -> Iterator[Cluster]:
    yield from cluster_of("mha", prefill_pp=2)


def test_pp2_prefill_stages_each_write_their_layers_into_decode_pp1(pipeline: Cluster) -> None:
    decode = pipeline.decodes[0][0]
    first, last = pipeline.prefill
    transfer(pipeline, 41, aux=6)
    assert decode.call("holds", DST, SRC)  # layer 0 from stage 0, layer 1 from stage 1
    assert decode.call("aux", 6) == (41, 41 % 1000 + 1)
    assert first.call("posted", 41) > 0 and last.call("posted", 41) > 0
    assert_cleared(pipeline, 41)
