"""Every model family between real processes over raw regions: byte-identical, or failed everywhere.

GQA with replicated heads (2 KV heads over TP 4), MLA (one writer per decode
rank, the other prefill ranks only take part in the verdict), pipeline stages
(prefill PP 2 into decode PP 1 and PP 2), and a hybrid model with mamba state
rows and sliding-window pages sent with the last chunk; each rank's regions
are raw pointers into one arena, K and V apart, with several aux buffers.
The processes are shared by the whole module, as in :mod:`tests.test_tp`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.families import FamilyServer
from tests.ranks import Rank

FAST = {"heartbeat_interval": 0.1, "heartbeat_timeout": 1.0}
SRC = [3, 4, 5, 9, 10, 1, 2, 20, 21, 22, 14, 15, 16]  # runs and breaks, 13 pages
DST = [0, 1, 2, 3, 11, 12, 13, 30, 31, 7, 25, 26, 27]
STATE = {  # room -> (prefill rows, decode rows) per state space
    1: ({"mamba": [2], "swa": [5, 6]}, {"mamba": [6], "swa": [17, 18]}),
    2: ({"mamba": [3], "swa": [7, 8]}, {"mamba": [7], "swa": [19, 20]}),
}
Shape = tuple[int, int]  # (tp, pp)


@pytest.fixture(scope="module")
def ranks() -> Iterator[tuple[list[Rank], list[Rank]]]:
    prefill = [Rank(f"prefill-{i}", server=FamilyServer) for i in range(4)]
    decode = [Rank(f"decode-{i}", server=FamilyServer) for i in range(4)]
    yield prefill, decode
    for rank in prefill + decode:
        rank.kill()
        assert not rank.alive(), f"{rank.name} outlived the tests"


def start(
    ranks: tuple[list[Rank], list[Rank]], family: str, p: Shape, d: Shape, **extra: object
) -> tuple[list[str], list[Rank], list[Rank]]:
    """Managers of ``family`` on the first ranks, stage-major; returns prefill's addresses."""
    prefill, decode = ranks[0][: p[0] * p[1]], ranks[1][: d[0] * d[1]]
    addrs = [
        r.call("start", "prefill", family, (i % p[0], p[0]), (i // p[0], p[1]), **FAST)
        for i, r in enumerate(prefill)
    ]
    for i, r in enumerate(decode):
        r.call("start", "decode", family, (i % d[0], d[0]), (i // d[0], d[1]), **FAST, **extra)
    return addrs, prefill, decode


def state(family: str, room: int, side: int) -> dict[str, list[int]] | None:
    return STATE[room][side] if family == "hybrid" else None


CASES = [
    ("gqa", (4, 1), (2, 1)),
    ("gqa", (2, 1), (4, 1)),
    ("mla", (1, 1), (2, 1)),
    ("mla", (2, 1), (1, 1)),
    ("mla", (4, 1), (2, 1)),
    ("pp", (1, 2), (1, 1)),
    ("pp", (1, 2), (1, 2)),
    ("pp", (2, 2), (2, 1)),
    ("hybrid", (2, 1), (1, 1)),
    ("hybrid", (1, 1), (2, 1)),
]


@pytest.mark.parametrize(("family", "p", "d"), CASES, ids=[f"{f}-{p}-{d}" for f, p, d in CASES])
def test_every_family_arrives_byte_identical(
    ranks: tuple[list[Rank], list[Rank]], family: str, p: Shape, d: Shape
) -> None:
    addrs, pre, dec = start(ranks, family, p, d)
    try:
        for r in dec:  # room 1: aux and no prefix; room 2: a 3-page prefix
            r.call("receiver", 1, addrs, DST, aux=5, state=state(family, 1, 1))
            r.call("receiver", 2, addrs, DST[3:], prefix=3, state=state(family, 2, 1))
        for r in pre:
            for room in (1, 2):
                r.call("sender", room)
        for r in pre:
            assert r.call("wait", [1, 2], ["WaitingForInput"], 10) == dict.fromkeys([1, 2], "WaitingForInput")
            r.call("init", 1, len(SRC), aux=2)
            r.call("init", 2, len(SRC))
            for room in (1, 2):
                r.call("send", room, SRC[:6])
                r.call("send", room, SRC[6:], state=state(family, room, 0))
        for r in pre + dec:
            got = r.call("wait", [1, 2], ["Success", "Failed"], 10)
            assert got == {1: "Success", 2: "Success"}, (r.name, r.call("failure", 1), r.call("failure", 2))
        moved: dict[str, tuple[list[int], list[int]]] = {"kv": (SRC, DST), "aux": ([2], [5])}
        if family == "hybrid":
            for space in ("mamba", "swa"):
                for room in (1, 2):
                    src, dst = STATE[room][0][space], STATE[room][1][space]
                    moved[f"{space}{room}"] = (src, dst)
        for r in dec:
            per_room = [{k: v for k, v in moved.items() if not k[-1].isdigit() or k.endswith(str(room))}
                        for room in (1, 2)]  # fmt: skip
            for room, want in zip((1, 2), per_room, strict=True):
                want = {k.rstrip("12"): v for k, v in want.items()}
                assert r.call("received", want) == [], f"{r.name}: room {room} differs"
        for r in pre + dec:
            for room in (1, 2):
                r.call("clear", room)
                assert r.call("footprint", room) == [], r.name
    finally:
        for r in pre + dec:
            r.call("stop")


KILLS = [
    ("gqa", (4, 1), (2, 1), "prefill", 3),
    ("mla", (2, 1), (1, 1), "prefill", 1),  # a rank that only takes part in the verdict
    ("pp", (1, 2), (1, 1), "prefill", 1),  # the second stage
    ("hybrid", (1, 1), (2, 1), "decode", 1),
]


@pytest.mark.parametrize(
    ("family", "p", "d", "side", "victim"), KILLS, ids=[f"{k[0]}-{k[3]}{k[4]}" for k in KILLS]
)
def test_killing_one_rank_mid_transfer_fails_the_room_on_every_survivor(
    ranks: tuple[list[Rank], list[Rank]], family: str, p: Shape, d: Shape, side: str, victim: int
) -> None:
    addrs, pre, dec = start(ranks, family, p, d)
    group = ranks[0] if side == "prefill" else ranks[1]
    dead = group[victim]
    try:
        for r in dec:
            r.call("receiver", 7, addrs, DST, aux=1, state=state(family, 1, 1))
        for r in pre:
            r.call("sender", 7)
            assert r.call("wait", [7], ["WaitingForInput"], 10) == {7: "WaitingForInput"}
            r.call("init", 7, len(SRC), aux=0)
            r.call("send", 7, SRC[:6])  # the first chunk only: every rank is mid-transfer
        for r in pre + dec:
            assert r.call("wait", [7], ["Transferring"], 10)[7] == "Transferring", r.name
        dead.kill()
        survivors = [r for r in pre + dec if r is not dead]
        for r in survivors:
            if r in pre:
                r.call("send", 7, SRC[6:], state=state(family, 1, 0))  # racing the failure: no exception
        for r in survivors:
            assert r.call("wait", [7], ["Failed"], 10) == {7: "Failed"}, r.name
            assert r.call("footprint", 7) == [], r.name
            assert r.call("failure", 7).split(":")[0] in {"PeerLostError", "RemoteFailureError"}
    finally:
        for r in pre + dec:
            if r is not dead:
                r.call("stop")
        group[victim] = Rank(dead.name, server=FamilyServer)  # the next case gets a fresh process


@pytest.mark.parametrize("field", ["head_dim", "dtype", "layer count", "total heads", "state shapes"])
def test_incompatible_layouts_are_refused_in_the_handshake_naming_the_field(
    ranks: tuple[list[Rank], list[Rank]], field: str
) -> None:
    addrs, pre, dec = start(ranks, "hybrid", (1, 1), (1, 1), variant=field)
    try:
        dec[0].call("receiver", 9, addrs, DST, state=STATE[1][1] if field != "state shapes" else None)
        assert dec[0].call("wait", [9], ["Failed"], 10) == {9: "Failed"}
        error = dec[0].call("failure", 9)
        assert error.startswith("IncompatiblePeerError") and f"{field} (" in error, error
        assert dec[0].call("footprint", 9) == [] and pre[0].call("snapshot")["peers"] == []
    finally:
        for r in pre + dec:
            r.call("stop")


def test_bad_regions_are_refused_naming_the_region_before_any_manager_starts() -> None:
    from kvroom import KVManager
    from kvroom.planning import RankLayout, RankRegions
    from kvroom.transport.regions import Region, RegionPool
    from tests.families import Arena, _family

    layout = RankLayout(_family("gqa"), 0, 2)
    arena = Arena(layout)
    k0 = arena.pool.kv[0]
    wrong = Region(k0.name, k0.addr, k0.length, k0.item_bytes // 2)  # half a page per item
    pool = RegionPool((wrong, *arena.pool.kv[1:]), arena.pool.aux)
    with pytest.raises(
        ValueError, match=r"region 'k\.0': item size 32, the layout says 64 \(tp rank 0 of 2\)"
    ):
        KVManager("prefill", RankRegions(layout, pool), audit=False)
    overlapping = Region("v.1", k0.addr + 8, k0.length, k0.item_bytes)
    with pytest.raises(ValueError, match=r"region 'v\.1' .* overlaps region 'k\.0'"):
        RegionPool((*arena.pool.kv[:-1], overlapping), arena.pool.aux)


def test_only_tp_rank_0_of_stage_0_coordinates() -> None:
    from kvroom import KVManager
    from kvroom.planning import RankLayout, RankRegions
    from tests.families import Arena, _family

    for (tp, pp), coordinates in (((0, 0), True), ((1, 0), False), ((0, 1), False)):
        layout = RankLayout(_family("pp"), tp, 2, pp, 2)
        arena = Arena(layout)
        manager = KVManager("prefill", RankRegions(layout, arena.pool), audit=False)
        try:
            assert manager.side.coordinator is coordinates, (tp, pp)
        finally:
            manager.close()


def test_addresses_out_of_stage_major_order_fail_the_room_naming_the_rule(
    ranks: tuple[list[Rank], list[Rank]],
) -> None:
    addrs, pre, dec = start(ranks, "pp", (1, 2), (1, 1))
    try:
        dec[0].call("receiver", 11, addrs[::-1], DST)  # stage 1 listed first
        assert dec[0].call("wait", [11], ["Failed"], 10) == {11: "Failed"}
        error = dec[0].call("failure", 11)
        assert "IncompatiblePeerError" in error and "stage-major" in error and "pp 1 of 2" in error, error
        assert dec[0].call("footprint", 11) == []
    finally:
        for r in pre + dec:
            r.call("stop")
