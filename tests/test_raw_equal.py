"""The raw NIXL loop with equal work really checks the bytes it moves (kvroom.demo.raw_equal).

The decode side (:class:`RoomChecker`) is fed notifications by hand; the
whole loop (:func:`equal_work_writes`) runs over an in-process stand-in for
NIXL that copies the descriptors' bytes and delivers the notifications to
the checker, so corrupt, missing or stale bytes must show in the verdicts.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from kvroom.demo.raw_equal import (
    RoomChecker,
    equal_work_writes,
    parse_verdict,
    parse_write_notif,
    verdict_notif,
    write_notif,
)
from kvroom.demo.workload import PagePattern

TENSORS, PAGES, ROW = 3, 64, 256


def pools() -> tuple[np.ndarray, np.ndarray, PagePattern]:
    """Prefill's block (its "KV" prepared) and decode's (zeros), one pattern."""
    pattern = PagePattern(TENSORS, ROW, seed=3, bank_rows=5)
    src = np.zeros((TENSORS, PAGES, ROW), np.uint8)
    pattern.prepare(src)
    return src, np.zeros_like(src), pattern


def test_notifications_round_trip_and_others_are_not_theirs() -> None:
    msg = write_notif(1007, 3, 2, np.array([5, 9, 12], dtype=np.int64))
    room, first, writes, pages = parse_write_notif(msg) or (0, 0, 0, np.zeros(0))
    assert (room, first, writes, pages.tolist()) == (1007, 3, 2, [5, 9, 12])
    assert parse_write_notif(b"raw") is None and parse_verdict(b"raw") is None
    assert parse_verdict(msg) is None and parse_write_notif(verdict_notif(1, True)) is None
    for verdict in (True, False, None):
        assert parse_verdict(verdict_notif(1007, verdict)) == (1007, verdict)


def deliver(src: np.ndarray, dst: np.ndarray, src_pages: list[int], dst_pages: list[int]) -> None:
    """What a WRITE does: the source pages' bytes land in the destination pages."""
    dst[:, dst_pages] = src[:, src_pages]


def test_a_room_is_checked_once_all_its_writes_arrived_in_any_order() -> None:
    src, dst, pattern = pools()
    src_pages, dst_pages, first = [4, 5, 20, 33], [60, 2, 7, 8], 2  # request pages 2..5
    checker = RoomChecker(dst, pattern, verify=True)  # before the loop starts
    pattern.stamp(src, 1001, np.arange(first, first + 4), np.array(src_pages))
    deliver(src, dst, src_pages, dst_pages)
    assert checker.take(write_notif(1001, first + 2, 2, np.array(dst_pages[2:]))) is None  # the later chunk
    assert checker.take(b"raw") is None
    assert checker.take(write_notif(1001, first, 2, np.array(dst_pages[:2]))) == verdict_notif(1001, True)
    assert checker.stats() == {
        "rooms": 1, "intact": 1, "broken": 0, "bytes_verified": 4 * TENSORS * ROW, "incomplete": 0,
    }  # fmt: skip
    assert not dst[:, dst_pages, : PagePattern.STAMP].any()  # stamps zeroed: a page not rewritten fails next


@pytest.mark.parametrize("fault", ["body byte", "stamp", "missing page", "stale page"])
def test_wrong_bytes_are_found(fault: str) -> None:
    src, dst, pattern = pools()
    src_pages, dst_pages = [1, 2, 3], [10, 11, 40]
    pattern.stamp(src, 1002, np.arange(3), np.array(src_pages))
    if fault == "stale page":  # kvroom's run left this very room's valid pages (room ids repeat)
        deliver(src, dst, src_pages, dst_pages)
    checker = RoomChecker(dst, pattern, verify=True)  # clears the stamps an earlier run left
    if fault in ("missing page", "stale page"):  # the last page never written this time
        deliver(src, dst, src_pages[:2], dst_pages[:2])
    else:
        deliver(src, dst, src_pages, dst_pages)
        dst[1, dst_pages[1], 100 if fault == "body byte" else 3] ^= 0x40
    assert checker.take(write_notif(1002, 0, 1, np.array(dst_pages))) == verdict_notif(1002, False)
    assert checker.stats()["broken"] == 1 and checker.stats()["bytes_verified"] == 0


def test_without_verify_nothing_is_read_or_cleared() -> None:
    _, dst, pattern = pools()
    dst[:] = 7
    checker = RoomChecker(dst, pattern, verify=False)
    assert checker.take(write_notif(1003, 0, 1, np.array([1, 2]))) == verdict_notif(1003, None)
    assert checker.stats()["rooms"] == 1 and checker.stats()["bytes_verified"] == 0
    assert (dst == 7).all()


class FakeNixl:
    """NIXL as the loop uses it, in one process: WRITEs copy bytes; notifications hop to a peer."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.inbox: dict[str, list[bytes]] = {}
        self.peers: dict[str, FakeNixl] = {}
        self.posted = 0

    def add_remote_agent(self, md: FakeNixl) -> str:
        self.peers[md.name] = md
        return md.name

    def remove_remote_agent(self, name: str) -> None:
        del self.peers[name]

    def get_xfer_descs(self, descs: np.ndarray, mem: str) -> np.ndarray:
        return descs

    def initialize_xfer(self, op: str, local: Any, remote: Any, peer: str, notif: bytes) -> Any:
        return (local, remote, peer, notif)

    def transfer(self, handle: Any) -> str:
        local, remote, peer, notif = handle
        for (src, n, _), (dst, m, _) in zip(local.tolist(), remote.tolist(), strict=True):
            assert n == m
            ctypes.memmove(dst, src, n)
        self.posted += 1
        self.peers[peer].inbox.setdefault(self.name, []).append(notif)
        return "PROC"

    def check_xfer_state(self, handle: Any) -> str:
        return "DONE"

    def release_xfer_handle(self, handle: Any) -> None:
        pass

    def send_notif(self, peer: str, msg: bytes) -> None:
        self.peers[peer].inbox.setdefault(self.name, []).append(msg)

    def get_new_notifs(self) -> dict[str, list[bytes]]:
        inbox, self.inbox = self.inbox, {}
        return inbox


def run_loop(verify: bool, corrupt: bool = False) -> tuple[dict[str, Any], RoomChecker]:
    """Four rooms over two lanes through the fake NIXL; decode answers as its loop turn would."""
    src, dst, pattern = pools()
    prefill, decode = FakeNixl("prefill"), FakeNixl("decode")
    checker = RoomChecker(dst, pattern, verify=verify)
    decode.add_remote_agent(prefill)

    def notifs() -> dict[str, list[bytes]]:  # prefill's poll: decode's turn runs first
        for peer, messages in decode.get_new_notifs().items():
            for msg in messages:
                parsed = parse_write_notif(msg)
                if corrupt and parsed is not None and parsed[0] == 1002:  # one byte of one room's page
                    dst[0, parsed[3][0], -1] ^= 1
                reply = checker.take(msg)
                if reply is not None:
                    decode.send_notif(peer, reply)
        inbox, prefill.inbox = prefill.inbox, {}
        return inbox

    prefill.get_new_notifs = notifs
    agent = SimpleNamespace(
        agent=prefill, pool_pages=PAGES, page_bytes=ROW, bases=[src[t].ctypes.data for t in range(TENSORS)]
    )
    peers = {0: {"md": decode, "bases": [dst[t].ctypes.data for t in range(TENSORS)], "pages": PAGES}}
    rooms = [(0, 1000 + i, i % 3, n) for i, n in enumerate([20, 7, 31, 0, 12])]
    result = equal_work_writes(agent, src, pattern, peers, rooms, concurrency=2, chunk_pages=8, verify=verify)
    return result, checker


def test_the_whole_loop_checks_every_byte_it_moves() -> None:
    result, checker = run_loop(verify=True)
    moved = (20 + 7 + 31 + 12) * TENSORS * ROW
    assert result["bytes"] == moved and result["seconds"] >= 0 and result["lanes"] == 2
    assert result["writes"] == 3 + 1 + 4 + 2  # chunks of 8 pages
    assert (result["intact"], result["broken"], result["unchecked"]) == (4, 0, 0)
    assert checker.stats() == {"rooms": 4, "intact": 4, "broken": 0, "bytes_verified": moved, "incomplete": 0}


def test_the_whole_loop_reports_a_corrupt_room() -> None:
    result, checker = run_loop(verify=True, corrupt=True)
    assert (result["intact"], result["broken"]) == (3, 1) and checker.stats()["broken"] == 1


def test_the_whole_loop_without_verify_checks_nothing() -> None:
    result, checker = run_loop(verify=False)
    assert (result["intact"], result["broken"], result["unchecked"]) == (0, 0, 4)
    assert checker.stats()["bytes_verified"] == 0 and checker.stats()["rooms"] == 4
