"""The raw figure with equal work: the plain NIXL WRITE loop plus kvroom's run's per-room checks.

kvroom's run checks every byte it moves: prefill stamps a room's pages
(:meth:`~kvroom.demo.workload.PagePattern.stamp`) when it creates the room,
decode zeroes the stamps of the rows it will receive and, on Success, reads
every byte of them against the stamp and the pattern bank
(:meth:`~kvroom.demo.workload.PagePattern.check`, in decode's scheduler loop),
and a room holds its decode pages, inside the ``concurrency`` window, until
that check is done.  The loop here does the same work around the same WRITEs
as :func:`kvroom.demo.raw.raw_writes`, between the same bare agents:

* prefill (:func:`equal_work_writes`) builds every room's WRITEs before the
  clock starts, one per chunk of ``chunk_pages``, from sorted random page
  lists.  Room ``k`` takes its pages from lane ``k % lanes``: the pools are
  cut into disjoint random page sets, so rooms in flight never share a page
  (the rooms of one lane follow each other, each lane as soon as its
  last room is done, so no lane waits for another).  Timed: per room, prefill
  stamps its source pages with the same call, posts its WRITEs, each one's
  notification naming the room, its first request page and its destination
  pages (:func:`write_notif`), and spins until the room's WRITEs are DONE
  and decode's verdict came back;
* decode (:class:`RoomChecker`, in its loop's turn, as kvroom's checks run)
  gathers a room's notifications and, once all of its WRITEs arrived, checks
  every byte of its pages with the same call kvroom's run makes for a KV
  group, zeroes their stamps (so a page never written in a later room fails)
  and sends its verdict (:func:`verdict_notif`).

With ``verify`` False (``kvroom demo --no-verify``, where kvroom's run checks
nothing either) neither side stamps or checks; decode still answers once a
room's WRITEs all arrived.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvroom.demo.raw import RawAgent, chunk_descs
from kvroom.demo.workload import PagePattern
from kvroom.transport.descriptors import IntArray

__all__ = [
    "RoomChecker",
    "equal_work_writes",
    "parse_verdict",
    "parse_write_notif",
    "verdict_notif",
    "write_notif",
]

_WRITE = b"rv"
_VERDICT = b"ra"
_VERDICTS = {True: b"1", False: b"0", None: b"-"}


def write_notif(room: int, first: int, writes: int, dst: IntArray) -> bytes:
    """A WRITE's notification: ``dst`` pages hold request pages ``first..``; the room has ``writes``."""
    return b"%s:%d:%d:%d:%s" % (_WRITE, room, first, writes, b",".join(b"%d" % p for p in dst.tolist()))


def parse_write_notif(msg: bytes) -> tuple[int, int, int, IntArray] | None:
    """(room, first request page, WRITEs of the room, destination pages); None if not one."""
    parts = msg.split(b":")
    if len(parts) != 5 or parts[0] != _WRITE:
        return None
    pages = np.array([int(p) for p in parts[4].split(b",")], dtype=np.int64)
    return int(parts[1]), int(parts[2]), int(parts[3]), pages


def verdict_notif(room: int, intact: bool | None) -> bytes:
    """Decode's answer for a room: intact, not intact, or not checked (None)."""
    return b"%s:%d:%s" % (_VERDICT, room, _VERDICTS[intact])


def parse_verdict(msg: bytes) -> tuple[int, bool | None] | None:
    """(room, intact or None when unchecked); None if ``msg`` is not a verdict."""
    parts = msg.split(b":")
    if len(parts) != 3 or parts[0] != _VERDICT:
        return None
    return int(parts[1]), {b"1": True, b"0": False}.get(parts[2])


class RoomChecker:
    """Decode's side: gather a room's WRITE notifications, check its bytes once all arrived.

    ``block``: the pool's raw KV group, ``[tensors, pages, row_bytes]`` (what
    the bare agent registered); ``pattern``: its :class:`PagePattern`.
    """

    def __init__(self, block: np.ndarray, pattern: PagePattern, verify: bool) -> None:
        self.block = block
        self.pattern = pattern
        self.verify = verify
        self._parts: dict[int, list[tuple[int, IntArray]]] = {}
        self.rooms = 0  # rooms whose WRITEs all arrived
        self.intact = 0  # of them, checked and intact
        self.broken = 0  # checked and not intact
        self.bytes_verified = 0  # bytes read and found right (every byte of the intact rooms)
        if verify:  # kvroom's run left valid stamps of the same room ids: none may pass here
            block[:, :, : PagePattern.STAMP] = 0

    def take(self, msg: bytes) -> bytes | None:
        """One notification; returns the verdict once it completes its room (else None)."""
        parsed = parse_write_notif(msg)
        if parsed is None:
            return None
        room, first, writes, dst = parsed
        parts = self._parts.setdefault(room, [])
        parts.append((first, dst))
        if len(parts) < writes:  # notifications can overtake each other: count them
            return None
        del self._parts[room]
        self.rooms += 1
        if not self.verify:
            return verdict_notif(room, None)
        parts.sort(key=lambda part: part[0])
        request = np.concatenate([np.arange(lo, lo + d.size, dtype=np.int64) for lo, d in parts])
        rows = np.concatenate([d for _, d in parts])
        intact = self.pattern.check(self.block, room, request, rows)
        self.block[:, rows, : PagePattern.STAMP] = 0
        if intact:
            self.intact += 1
            self.bytes_verified += rows.size * self.block.shape[0] * self.block.shape[2]
        else:
            self.broken += 1
        return verdict_notif(room, intact)

    def stats(self) -> dict[str, int]:
        """Rooms complete, intact and broken, and the bytes verified."""
        return {
            "rooms": self.rooms,
            "intact": self.intact,
            "broken": self.broken,
            "bytes_verified": self.bytes_verified,
            "incomplete": len(self._parts),
        }


@dataclass
class _Room:
    """One room of the loop, its WRITEs built."""

    room: int
    lane: int
    first: int  # its first request page (decode's cached prefix)
    src: IntArray
    writes: list[tuple[Any, Any, str, bytes]]  # (local descs, remote descs, peer, notification)


def _lanes(rng: np.random.Generator, pages: int, lanes: int) -> list[IntArray]:
    return [np.asarray(s, dtype=np.int64) for s in np.array_split(rng.permutation(pages), lanes)]


def _pick(rng: np.random.Generator, pages: IntArray, n: int) -> IntArray:
    return np.sort(rng.choice(pages, size=n, replace=False)).astype(np.int64)


def equal_work_writes(
    agent: RawAgent,
    block: np.ndarray,
    pattern: PagePattern,
    peers: dict[int, dict[str, Any]],
    rooms: list[tuple[int, int, int, int]],
    concurrency: int,
    chunk_pages: int = 0,
    seed: int = 0,
    verify: bool = True,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Prefill: move ``rooms`` (decode index, room id, first request page, pages) with decode's checks.

    ``peers``: decode index -> :meth:`RawAgent.info` (their agents already
    :meth:`~RawAgent.serve` this one).  Returns ``seconds`` (the whole loop),
    ``bytes``, ``writes``, ``lanes`` and the verdicts: ``intact``, ``broken``,
    ``unchecked``; ``error`` instead of ``seconds`` when a verdict never came.
    """
    nixl = agent.agent
    names = {index: nixl.add_remote_agent(info["md"]) for index, info in peers.items()}
    rng = np.random.default_rng(seed)
    moving = [r for r in rooms if r[3] > 0]
    largest = max([n for *_, n in moving], default=1)
    pools = [agent.pool_pages, *(int(info["pages"]) for info in peers.values())]
    lanes = max(1, min(concurrency, *(p // largest for p in pools)))
    src_lanes = _lanes(rng, agent.pool_pages, lanes)
    dst_lanes = {i: _lanes(rng, int(info["pages"]), lanes) for i, info in peers.items()}
    page_bytes = agent.page_bytes
    plan: list[_Room] = []
    for k, (decode, room, first, npages) in enumerate(moving):  # built before timing
        lane = k % lanes
        src, dst = _pick(rng, src_lanes[lane], npages), _pick(rng, dst_lanes[decode][lane], npages)
        step = chunk_pages or npages
        chunks = chunk_descs(nixl, agent.bases, peers[decode]["bases"], page_bytes, src, dst, chunk_pages)
        writes = [
            (local, remote, names[decode], write_notif(room, first + lo, len(chunks), dst[lo : lo + step]))
            for lo, local, remote in chunks
        ]
        plan.append(_Room(room, lane, first, src, writes))

    busy: dict[int, tuple[int, list[Any]]] = {}  # lane -> (room, its WRITEs not DONE yet)
    waiting: set[int] = set()  # rooms without a verdict yet
    verdicts: dict[int, bool | None] = {}

    def poll() -> None:
        """Take decode's verdicts, reap DONE WRITEs, free the lanes whose room is both."""
        for messages in nixl.get_new_notifs().values():
            for msg in messages:
                verdict = parse_verdict(msg)
                if verdict is not None and verdict[0] in waiting:
                    waiting.discard(verdict[0])
                    verdicts[verdict[0]] = verdict[1]
        for lane, (room, handles) in list(busy.items()):
            handles[:] = [h for h in handles if not _done(nixl, h)]
            if not handles and room not in waiting:  # a lane is free once checked and released
                del busy[lane]

    def post(entry: _Room) -> None:
        """Stamp the room's source pages and post its WRITEs."""
        if verify:  # what PrefillLoop.create does for the room (DemoBuffers.stamp, on this group)
            pattern.stamp(block, entry.room, np.arange(entry.first, entry.first + entry.src.size), entry.src)
        waiting.add(entry.room)
        handles = []
        for local, remote, peer, notif in entry.writes:
            handle = nixl.initialize_xfer("WRITE", local, remote, peer, notif)
            nixl.transfer(handle)
            handles.append(handle)
        busy[entry.lane] = (entry.room, handles)

    queues = [deque(r for r in plan if r.lane == lane) for lane in range(lanes)]
    start = time.perf_counter()
    deadline = time.monotonic() + timeout
    while (busy or any(queues)) and time.monotonic() < deadline:
        for lane, queue in enumerate(queues):  # each lane posts its next room once its last one is done
            if queue and lane not in busy:
                post(queue.popleft())
        poll()
    seconds = time.perf_counter() - start
    for name in names.values():
        nixl.remove_remote_agent(name.decode() if isinstance(name, bytes) else name)
    result: dict[str, Any] = {
        "bytes": sum(r.src.size for r in plan) * page_bytes * len(agent.bases),
        "writes": sum(len(r.writes) for r in plan),
        "lanes": lanes,
        "intact": sum(v is True for v in verdicts.values()),
        "broken": sum(v is False for v in verdicts.values()),
        "unchecked": sum(v is None for v in verdicts.values()),
    }
    if busy or any(queues):
        result["error"] = f"{len(waiting)} rooms had no verdict from decode after {timeout:g} s"
    else:
        result["seconds"] = seconds
    return result


def _done(nixl: Any, handle: Any) -> bool:
    """True (and the handle released) once the WRITE is DONE."""
    if nixl.check_xfer_state(handle) == "DONE":
        nixl.release_xfer_handle(handle)
        return True
    return False
