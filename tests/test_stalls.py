"""Stopped processes (SIGSTOP / SIGCONT) with real NIXL: both sides agree, nobody blames a peer
for its own pause, and the pair serves new rooms afterwards."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.conftest import TRANSPORTS
from tests.ranks import Rank

pytestmark = pytest.mark.slow

SRC = list(range(13))
ROOMS_PER_ROUND = 4


def dst(k: int) -> list[int]:
    """Decode pages of the k-th room of a round (4 rooms x 13 pages fit the 64-page pools)."""
    return list(range(13 * k, 13 * k + 13))


@pytest.fixture(params=list(TRANSPORTS))
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Rank, Rank]]:
    env = TRANSPORTS[request.param]
    prefill, decode = Rank("prefill", env), Rank("decode", env)
    yield prefill, decode
    for rank in (prefill, decode):
        rank.kill()
        assert not rank.alive(), f"{rank.name} outlived its test"


def open_rooms(prefill: Rank, decode: Rank, addr: str, rooms: list[int]) -> None:
    """Rooms with the first chunk sent: every one of them is mid-transfer."""
    for k, room in enumerate(rooms):
        decode.call("receiver", room, [addr], dst(k), aux=1)
    for room in rooms:
        prefill.call("sender", room)
    assert prefill.call("wait", rooms, ["WaitingForInput"], 20) == dict.fromkeys(rooms, "WaitingForInput")
    for room in rooms:
        prefill.call("init", room, len(SRC), aux=0)
        prefill.call("send", room, SRC[:6])


def finish(rank: Rank, rooms: list[int], timeout: float) -> dict[int, str]:
    got = rank.call("wait", rooms, ["Success", "Failed"], timeout)
    assert set(got.values()) <= {"Success", "Failed"}, (rank.name, got)
    return got


def serves_new_rooms(prefill: Rank, decode: Rank, addr: str, first: int) -> None:
    """After the trouble, the same two processes move a room byte for byte."""
    rooms = [first, first + 1]
    open_rooms(prefill, decode, addr, rooms)
    for room in rooms:
        prefill.call("send", room, SRC[6:])
    assert finish(prefill, rooms, 30) == dict.fromkeys(rooms, "Success")
    assert finish(decode, rooms, 30) == dict.fromkeys(rooms, "Success")
    for k, room in enumerate(rooms):
        assert decode.call("holds", dst(k), SRC)
        for rank in (prefill, decode):
            rank.call("clear", room)
            assert rank.call("footprint", room) == []


def test_decode_stopped_past_prefills_deadline_ends_every_room_alike_on_both_sides(
    pair: tuple[Rank, Rank], request: pytest.FixtureRequest
) -> None:
    """One rank on each side: prefill commits at its own DONE (protocol 8).  Where its WRITEs
    finish without the target (the default transports, once connected) the rooms succeed on
    both sides, decode when it resumes; where they need the target (UCX over TCP) prefill's
    Transferring deadline fails them, on both sides.  Never one verdict on each side."""
    prefill, decode = pair
    one_sided = request.node.callspec.params["pair"] == "default"
    # prefill's Transferring deadline is short; heartbeats are far off: only deadlines act
    addr = prefill.call("start", "prefill", 0, 1, deadlines=(10.0, 20.0, 0.5), heartbeat_timeout=30.0)
    decode.call("start", "decode", 0, 1, deadlines=(10.0, 30.0, 30.0), heartbeat_timeout=30.0)
    serves_new_rooms(prefill, decode, addr, 90_000)  # UCX's connection is up (its wire-up needs decode)
    expected = "Success" if one_sided else "Failed"
    for round_ in range(20):
        rooms = [1000 * round_ + k for k in range(ROOMS_PER_ROUND)]
        open_rooms(prefill, decode, addr, rooms)
        decode.pause()
        try:
            for room in rooms:  # the rest lands (or waits in the socket) while decode is stopped
                prefill.call("send", room, SRC[6:])
            verdicts = finish(prefill, rooms, 20)
        finally:
            decode.resume()
        assert verdicts == dict.fromkeys(rooms, expected), (round_, verdicts)
        if not one_sided:
            assert all("Transferring deadline" in prefill.call("failure", r) for r in rooms)
        # decode saw every byte land either way; it follows the coordinator's commit, or its failure
        assert finish(decode, rooms, 20) == verdicts, round_
        for k, room in enumerate(rooms):
            if one_sided:
                assert decode.call("holds", dst(k), SRC)
                for rank in (prefill, decode):
                    rank.call("clear", room)  # a Success room's state goes with the scheduler's clear
            for rank in (prefill, decode):
                assert rank.call("footprint", room) == []
    snap = decode.call("snapshot")
    assert snap["staging_free"] == snap["staging_capacity"]
    serves_new_rooms(prefill, decode, addr, 99_000)


def test_a_decode_rank_stopped_past_prefills_deadline_withholds_its_vote_and_fails_the_room_everywhere() -> (
    None
):
    """Prefill TP 1 to decode TP 2: the coordinator commits only with both votes.  Decode rank 0
    stopped past prefill's Transferring deadline cannot vote, so the room fails on every rank,
    decode rank 1 too, though every byte reached both."""
    prefill = Rank("prefill", {})
    decode = [Rank(f"decode-{j}", {}) for j in range(2)]
    try:
        addr = prefill.call("start", "prefill", 0, 1, deadlines=(10.0, 20.0, 0.5), heartbeat_timeout=30.0)
        for j, d in enumerate(decode):
            d.call(
                "start",
                "decode",
                j,
                2,
                staging_pages=128,
                deadlines=(10.0, 30.0, 30.0),
                heartbeat_timeout=30.0,
            )
        for round_ in range(5):
            rooms = [1000 * round_ + k for k in range(ROOMS_PER_ROUND)]
            for k, room in enumerate(rooms):
                for d in decode:
                    d.call("receiver", room, [addr], dst(k), aux=1)
            for room in rooms:
                prefill.call("sender", room)
            assert prefill.call("wait", rooms, ["WaitingForInput"], 20) == dict.fromkeys(
                rooms, "WaitingForInput"
            )
            for room in rooms:
                prefill.call("init", room, len(SRC), aux=0)
                prefill.call("send", room, SRC[:6])
            decode[0].pause()
            try:
                for room in rooms:
                    prefill.call("send", room, SRC[6:])
                verdicts = finish(prefill, rooms, 20)
            finally:
                decode[0].resume()
            assert verdicts == dict.fromkeys(rooms, "Failed"), (round_, verdicts)
            assert all("Transferring deadline" in prefill.call("failure", r) for r in rooms)
            for d in decode:
                assert finish(d, rooms, 20) == dict.fromkeys(rooms, "Failed"), (round_, d.name)
                for room in rooms:
                    assert d.call("footprint", room) == []
    finally:
        for rank in (prefill, *decode):
            rank.kill()
            assert not rank.alive(), f"{rank.name} outlived its test"


def test_a_stopped_decode_holds_none_of_prefills_writes_and_its_rooms_succeed_after() -> None:
    """WRITEs carry no NIXL notification, so DONE needs nothing from the target (one-sided
    transports: cma here): once UCX's connection is up (its wire-up needs the target), prefill's
    transfers finish while decode is stopped, the rooms succeed on prefill at DONE (one rank on
    each side: no vote), their WRITTEN (the commit) waits in the socket, and they succeed on
    decode once it runs again."""
    prefill, decode = Rank("prefill", {}), Rank("decode", {})
    try:
        addr = prefill.call("start", "prefill", 0, 1, deadlines=(10.0, 30.0, 30.0), heartbeat_timeout=30.0)
        decode.call("start", "decode", 0, 1, deadlines=(10.0, 30.0, 30.0), heartbeat_timeout=30.0)
        serves_new_rooms(prefill, decode, addr, 100)  # the connection is up
        rooms = [1, 2, 3, 4]
        open_rooms(prefill, decode, addr, rooms)
        decode.pause()
        try:
            for room in rooms:
                prefill.call("send", room, SRC[6:])
            deadline = time.monotonic() + 10
            while (in_flight := prefill.call("snapshot")["in_flight"]) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert in_flight == 0, "prefill's WRITEs waited for a stopped decode"
            # one rank on each side: committed at its own DONE, with no vote (protocol 8)
            assert finish(prefill, rooms, 10) == dict.fromkeys(rooms, "Success")
        finally:
            decode.resume()
        assert finish(decode, rooms, 20) == dict.fromkeys(rooms, "Success")
        assert finish(prefill, rooms, 20) == dict.fromkeys(rooms, "Success")
        for k in range(len(rooms)):
            assert decode.call("holds", dst(k), SRC)
    finally:
        for rank in (prefill, decode):
            rank.kill()
            assert not rank.alive(), f"{rank.name} outlived its test"


def stop_past_the_heartbeat(prefill: Rank, decode: Rank, stalled: Rank) -> tuple[str, list[int]]:
    """Rooms mid-transfer, then ``stalled`` stopped until its peer gave up on it (heartbeat 1 s).

    Returns the bootstrap address and the rooms, Failed on the peer by then and on both
    sides once ``stalled`` resumed; the peer failed them as PeerLostError.
    """
    beat = {"heartbeat_interval": 0.1, "heartbeat_timeout": 1.0}
    addr = prefill.call("start", "prefill", 0, 1, deadlines=(10.0, 20.0, 20.0), **beat)
    decode.call("start", "decode", 0, 1, deadlines=(10.0, 20.0, 20.0), **beat)
    rooms = [1, 2, 3]
    open_rooms(prefill, decode, addr, rooms)
    peer = decode if stalled is prefill else prefill
    stalled.pause()
    try:  # the running side gives up on the silent one after its heartbeat timeout
        assert finish(peer, rooms, 20) == dict.fromkeys(rooms, "Failed")
    finally:
        stalled.resume()
    assert all(peer.call("failure", r).startswith("PeerLostError") for r in rooms)
    assert finish(stalled, rooms, 20) == dict.fromkeys(rooms, "Failed")
    return addr, rooms


def test_decode_stopped_past_the_heartbeat_timeout_blames_itself_not_prefill(
    pair: tuple[Rank, Rank],
) -> None:
    prefill, decode = pair
    addr, rooms = stop_past_the_heartbeat(prefill, decode, stalled=decode)
    for room in rooms:
        reason = decode.call("failure", room)
        # decode learned it was forgotten; it did not call prefill silent for its own pause
        assert "no longer knows this decode" in reason, reason
        assert "went silent" not in reason
    serves_new_rooms(prefill, decode, addr, 10)


def test_prefill_stopped_past_the_heartbeat_timeout_forgets_its_peers_and_serves_again(
    pair: tuple[Rank, Rank],
) -> None:
    prefill, decode = pair
    addr, rooms = stop_past_the_heartbeat(prefill, decode, stalled=prefill)
    for room in rooms:
        reason = prefill.call("failure", room)
        assert "stalled" in reason, reason  # it knew the pause was its own
        assert prefill.call("footprint", room) == []
    serves_new_rooms(prefill, decode, addr, 10)
