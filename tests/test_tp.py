"""Heterogeneous tensor parallelism with real processes: prefill TP m -> decode TP n.

Each rank is its own process with its own NIXL agent.  Decode rank pages are
assembled from every prefill rank holding some of its heads, written in place
("direct") or through the decode staging ring and scattered ("staging").
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from tests.ranks import Rank

SIZES = (1, 2, 4)
FAST = {"heartbeat_interval": 0.1, "heartbeat_timeout": 1.0, "staging_chunk_pages": 4}
SRC = [3, 4, 5, 9, 10, 1, 2, 20, 21, 22, 40, 41, 42]  # runs and breaks, 13 pages
DST = [0, 1, 2, 3, 11, 12, 13, 30, 31, 7, 50, 51, 52]


@pytest.fixture(scope="module")
def ranks() -> Iterator[tuple[list[Rank], list[Rank]]]:
    prefill = [Rank(f"prefill-{i}") for i in range(max(SIZES))]
    decode = [Rank(f"decode-{i}") for i in range(max(SIZES))]
    yield prefill, decode
    for rank in prefill + decode:
        rank.kill()
        assert not rank.alive(), f"{rank.name} outlived the tests"


def start(
    prefill: list[Rank], decode: list[Rank], m: int, n: int, mode: str, **extra: object
) -> tuple[list[str], list[Rank], list[Rank]]:
    addrs = [
        r.call("start", "prefill", i, m, transfer_mode=mode, **FAST, **extra)
        for i, r in enumerate(prefill[:m])
    ]
    for i, r in enumerate(decode[:n]):
        r.call("start", "decode", i, n, staging_pages=128, transfer_mode=mode, **FAST, **extra)
    return addrs, prefill[:m], decode[:n]


@pytest.mark.parametrize("mode", ["direct", "staging"])
@pytest.mark.parametrize(("m", "n"), list(itertools.product(SIZES, SIZES)))
def test_every_tp_pair_reassembles_byte_identical_kv(
    ranks: tuple[list[Rank], list[Rank]], m: int, n: int, mode: str
) -> None:
    addrs, pre, dec = start(*ranks, m, n, mode)
    try:
        # room 1: no prefix, chunks crossing staging-chunk boundaries; room 2: a 3-page prefix
        for d in dec:
            d.call("receiver", 1, addrs, DST, aux=5)
            d.call("receiver", 2, addrs, DST[3:], prefix=3)
        for p in pre:
            for room in (1, 2):
                p.call("sender", room)
        for p in pre:
            assert p.call("wait", [1, 2], ["WaitingForInput"], 10) == {
                1: "WaitingForInput",
                2: "WaitingForInput",
            }
            p.call("init", 1, len(SRC), aux=2)
            p.call("init", 2, len(SRC))
            for chunk in (SRC[:6], SRC[6:9], SRC[9:]):
                p.call("send", 1, chunk)
                p.call("send", 2, chunk)
        for r in pre + dec:
            assert r.call("wait", [1, 2], ["Success", "Failed"], 10) == {1: "Success", 2: "Success"}, (
                r.name,
                r.call("failure", 1),
                r.call("failure", 2),
            )
        for d in dec:
            assert d.call("holds", DST, SRC), f"{d.name}: room 1 pages differ from prefill's"
            assert d.call("holds", DST[3:], SRC[3:]), f"{d.name}: room 2 pages differ from prefill's"
            assert d.call("aux", 5) == 3  # prefill aux slot 2 holds 3
        for r in pre + dec:
            for room in (1, 2):
                r.call("clear", room)
                assert r.call("footprint", room) == []
        for d in dec:
            snap = d.call("snapshot")
            assert snap["staging_free"] == snap["staging_capacity"] > 0
    finally:
        for r in pre + dec:
            r.call("stop")


@pytest.mark.parametrize(
    ("victim", "m", "n", "mode"),
    [
        ("prefill", 2, 2, "auto"),
        ("prefill", 2, 1, "auto"),
        ("prefill", 1, 2, "staging"),
        ("decode", 2, 2, "auto"),
    ],
)
def test_killing_one_rank_mid_transfer_fails_the_room_everywhere(
    victim: str, m: int, n: int, mode: str
) -> None:
    prefill = [Rank(f"prefill-{i}") for i in range(m)]
    decode = [Rank(f"decode-{i}") for i in range(n)]
    try:
        addrs, pre, dec = start(prefill, decode, m, n, mode)
        for d in dec:
            d.call("receiver", 7, addrs, DST, aux=1)
        for p in pre:
            p.call("sender", 7)
            assert p.call("wait", [7], ["WaitingForInput"], 10) == {7: "WaitingForInput"}
            p.call("init", 7, len(SRC), aux=0)
            p.call("send", 7, SRC[:6])  # the first chunk only: every rank is mid-transfer
        for r in pre + dec:
            assert r.call("wait", [7], ["Transferring"], 10)[7] == "Transferring", r.name
        dead = pre[0] if victim == "prefill" else dec[0]
        dead.kill()
        survivors = [r for r in pre + dec if r is not dead]
        for r in survivors:
            if r in pre:
                r.call("send", 7, SRC[6:])  # a scheduler racing the failure: no exception
        for r in survivors:
            assert r.call("wait", [7], ["Failed"], 10) == {7: "Failed"}, r.name
            assert r.call("footprint", 7) == [], r.name
            assert r.call("failure", 7).split(":")[0] in {"PeerLostError", "RemoteFailureError"}
        for d in dec:
            if d is not dead:
                snap = d.call("snapshot")
                assert snap["staging_free"] == snap["staging_capacity"]
    finally:
        for r in prefill + decode:
            r.kill()
        assert not any(r.alive() for r in prefill + decode)
