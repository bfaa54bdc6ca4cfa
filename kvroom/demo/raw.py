"""The raw figure: the demo's bytes moved by a plain NIXL WRITE loop between the same processes.

After the rooms ran, each demo process opens a second, bare NIXL agent over
the very tensors of its kvroom pool (progress thread off, as kvroom runs it).
Prefill then posts the run's WRITEs (per room of the run, one per chunk of
``chunk_pages``, as kvroom posts them: the same page counts and page sizes,
sorted random page lists on both sides, runs coalesced the way kvroom
coalesces them, one notification each), keeping at most ``concurrency``
rooms' WRITEs in flight, and spins on their states until all are DONE.
It also times WRITEs of one median-size room, one at a time: the floor for a
room's latency.  No rooms, no control messages, no verification: the figure
"without checks".  The figure "with equal work" is :mod:`kvroom.demo.raw_equal`'s
loop, over the same agents: decode's agent then hands each notification to
an :class:`Answerer` (its room checker) and sends back what it answers.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Protocol

import numpy as np

from kvroom.transport.descriptors import IntArray, page_runs, run_descriptors

__all__ = ["Answerer", "RawAgent", "chunk_descs", "raw_writes"]


class Answerer(Protocol):
    """What decode's agent hands its notifications to (the equal-work loop's room checker)."""

    def take(self, msg: bytes) -> bytes | None:
        """One notification; returns the notification to send back to its sender, if any."""

    def stats(self) -> dict[str, int]:
        """What it did, for the raw phase's report."""


class RawAgent:
    """A bare NIXL agent registering ``tensors`` (the kvroom pool's layer tensors)."""

    def __init__(self, role: str, tensors: list[Any], pool_pages: int, page_bytes: int) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        self.name = f"raw-{role}-{uuid.uuid4().hex[:8]}"
        self.agent = nixl_agent(self.name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        self._regs = [self.agent.register_memory(t) for t in tensors]
        self.bases = [int(t.data_ptr()) for t in tensors]
        self.pool_pages = pool_pages
        self.page_bytes = page_bytes
        self.answerer: Answerer | None = None
        self._peers: list[str] = []

    def info(self) -> dict[str, Any]:
        """What the initiator needs: metadata and layer addresses."""
        return {"md": self.agent.get_agent_metadata(), "bases": self.bases, "pages": self.pool_pages}

    def serve(self, initiator_md: bytes, answerer: Answerer) -> None:
        """Decode: answer the initiator's notifications through ``answerer`` (loads its metadata)."""
        self._peers.append(_name(self.agent.add_remote_agent(initiator_md)))
        self.answerer = answerer

    def drain(self) -> int:
        """Progress; hand notifications to the answerer (else drop them); returns how many arrived."""
        count = 0
        while True:
            replies = []
            for peer, messages in self.agent.get_new_notifs().items():
                count += len(messages)
                if self.answerer is not None:
                    for msg in messages:
                        reply = self.answerer.take(msg)
                        if reply is not None:
                            replies.append((peer, reply))
            for peer, reply in replies:
                self.agent.send_notif(peer, reply)
            if not replies:  # else: the next call flushes them (no progress thread), and may bring more
                return count

    def close(self) -> dict[str, int]:
        """Deregister the memory (the tensors stay kvroom's); returns the answerer's stats."""
        for name in self._peers:
            self.agent.remove_remote_agent(name)
        self._peers = []
        for reg in self._regs:
            self.agent.deregister_memory(reg)
        self._regs = []
        return self.answerer.stats() if self.answerer is not None else {}


def _name(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else name


def _pages(rng: np.random.Generator, pool_pages: int, n: int) -> IntArray:
    return np.sort(rng.choice(pool_pages, size=n, replace=False)).astype(np.int64)


def raw_writes(
    agent: RawAgent,
    peers: dict[int, dict[str, Any]],
    rooms: list[tuple[int, int]],
    concurrency: int,
    median_pages: int,
    chunk_pages: int = 0,
    repeats: int = 15,
    seed: int = 0,
) -> dict[str, Any]:
    """Prefill: WRITE ``rooms`` (decode index, pages) to ``peers``; returns seconds and room times.

    ``peers``: decode index -> :meth:`RawAgent.info`; ``chunk_pages`` 0: one
    WRITE per room.  Returns ``seconds`` (the whole loop), ``bytes`` and
    ``room_seconds`` (each of ``repeats`` moves of one ``median_pages`` room,
    alone).
    """
    nixl = agent.agent
    names = {index: nixl.add_remote_agent(info["md"]) for index, info in peers.items()}
    rng = np.random.default_rng(seed)
    page_bytes = agent.page_bytes

    def prepare(decode: int, npages: int) -> list[tuple[Any, Any, Any]]:
        """The descriptor lists of one room's WRITEs (one per chunk)."""
        src = _pages(rng, agent.pool_pages, npages)
        dst = _pages(rng, int(peers[decode]["pages"]), npages)
        chunks = chunk_descs(nixl, agent.bases, peers[decode]["bases"], page_bytes, src, dst, chunk_pages)
        return [(local, remote, names[decode]) for _lo, local, remote in chunks]

    def post(write: tuple[Any, Any, Any]) -> Any:
        handle = nixl.initialize_xfer("WRITE", write[0], write[1], write[2], b"raw")
        nixl.transfer(handle)
        return handle

    posts = [prepare(decode, npages) for decode, npages in rooms if npages > 0]  # built before timing
    total = sum(npages for _, npages in rooms) * page_bytes * len(agent.bases)
    start = time.perf_counter()
    in_flight: list[list[Any]] = []  # per room, its WRITEs' handles
    for room in posts:
        while len(in_flight) >= concurrency:
            in_flight = [still for handles in in_flight if (still := _reap(nixl, handles))]
        in_flight.append([post(write) for write in room])
    while in_flight:
        in_flight = [still for handles in in_flight if (still := _reap(nixl, handles))]
    seconds = time.perf_counter() - start
    room_seconds = []
    first = min(peers)
    for _ in range(repeats):
        writes = prepare(first, max(1, median_pages))
        t0 = time.perf_counter()
        handles = [post(write) for write in writes]
        while handles:
            handles = _reap(nixl, handles)
        room_seconds.append(time.perf_counter() - t0)
    for name in names.values():
        nixl.remove_remote_agent(_name(name))
    count = sum(len(room) for room in posts)
    return {"seconds": seconds, "bytes": total, "room_seconds": room_seconds, "writes": count}


def _reap(nixl: Any, handles: list[Any]) -> list[Any]:
    """The handles not DONE yet (the DONE ones are released)."""
    still = []
    for handle in handles:
        if nixl.check_xfer_state(handle) == "DONE":
            nixl.release_xfer_handle(handle)
        else:
            still.append(handle)
    return still


def chunk_descs(
    nixl: Any,
    bases: list[int],
    peer_bases: list[int],
    page_bytes: int,
    src: IntArray,
    dst: IntArray,
    chunk_pages: int,
) -> list[tuple[int, Any, Any]]:
    """One room's WRITEs, one per ``chunk_pages`` chunk (0: one): ``(first page, local, remote)`` descs."""
    step = chunk_pages or int(src.size)
    out = []
    for lo in range(0, int(src.size), step):
        s, d, n = page_runs(src[lo : lo + step], dst[lo : lo + step])
        local = nixl.get_xfer_descs(run_descriptors(bases, page_bytes, s, n), "DRAM")
        remote = nixl.get_xfer_descs(run_descriptors(peer_bases, page_bytes, d, n), "DRAM")
        out.append((lo, local, remote))
    return out
