"""A numpy oracle for WRITE plans: fake memory, memcpy of descriptor rows, logical KV.

Every region of every rank gets a numpy byte array at its (made-up) address.
Source regions are filled from one *logical* model state (per buffer and
section: ``[items, rows, heads, head_bytes]``), each rank with its own slice,
so replicas are identical as they are in an engine.  :func:`run_room` plans
a room from every source rank into every destination rank, executes the rows
as memcpy, and returns what the destination holds and which bytes were
written how often; :func:`expected` gathers and scatters the same logical
bytes directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from kvroom.planning import (
    ChunkIndices,
    JoinedIndices,
    RankLayout,
    RankRegions,
    WritePlan,
    align_chunk,
    assign,
    for_source,
    join_indices,
    plan_writes,
    route,
    synthetic_pool,
)

Truth = dict[str, list[np.ndarray]]


def logical_state(ranks: RankLayout, items: Mapping[str, int], seed: int) -> Truth:
    """Random logical bytes of every buffer: per section ``[items, rows, heads, head_bytes]``."""
    rng = np.random.default_rng(seed)
    truth: Truth = {}
    for b in ranks.model.buffers:
        truth[b.key] = [
            rng.integers(0, 256, (items[b.space], b.rows, s.heads, s.head_dim * b.elem_bytes), dtype=np.uint8)
            for s in b.sections
        ]
    return truth


class Memory:
    """Fake memory of one rank: a byte array per region."""

    def __init__(self, rank: RankRegions) -> None:
        self.rank = rank
        regions = sorted(rank.pool, key=lambda r: r.addr)
        self.starts = np.array([r.addr for r in regions], dtype=np.uint64)
        self.regions = regions
        self.bytes = {r.name: np.zeros(r.length, np.uint8) for r in regions}
        self.writes = {r.name: np.zeros(r.length, np.int32) for r in regions}
        self.initial = {k: v.copy() for k, v in self.bytes.items()}

    def fill_from(self, truth: Truth) -> None:
        """This rank's slice of the logical state."""
        lay = self.rank.layout
        for b in lay.buffers():
            parts = []
            for k, s in enumerate(b.sections):
                lo, hi = lay.heads(s)
                parts.append(truth[b.key][k][:, :, lo:hi].reshape(truth[b.key][k].shape[0], b.rows, -1))
            self.bytes[b.key][:] = np.concatenate(parts, axis=2).ravel()

    def fill_random(self, seed: int) -> None:
        """Garbage, to see what was not written."""
        rng = np.random.default_rng(seed)
        for arr in self.bytes.values():
            arr[:] = rng.integers(0, 256, arr.size, dtype=np.uint8)
        self.initial = {k: v.copy() for k, v in self.bytes.items()}

    def locate(self, addr: int, length: int) -> tuple[str, int]:
        """The region holding ``[addr, addr + length)`` and the offset in it."""
        i = int(np.searchsorted(self.starts, np.uint64(addr), side="right")) - 1
        assert i >= 0, f"address {addr:#x} below every region"
        region = self.regions[i]
        off = addr - region.addr
        assert off + length <= region.length, f"[{addr:#x}, +{length}) runs past region {region.name}"
        return region.name, off


def execute(plan: WritePlan, src: Memory, dst: Memory) -> None:
    """Copy every descriptor row of ``plan`` from ``src`` to ``dst``, counting written bytes."""
    for part in plan.parts:
        assert part.local.shape == part.remote.shape and part.local.dtype == np.uint64
        assert part.local_mem in ("DRAM", "VRAM") and part.remote_mem in ("DRAM", "VRAM")
        for (la, ll, _), (ra, rl, _) in zip(part.local.tolist(), part.remote.tolist(), strict=True):
            assert ll == rl > 0
            s_name, s_off = src.locate(la, ll)
            d_name, d_off = dst.locate(ra, rl)
            dst.bytes[d_name][d_off : d_off + rl] = src.bytes[s_name][s_off : s_off + ll]
            dst.writes[d_name][d_off : d_off + rl] += 1


@dataclass
class Room:
    """A request: its pages on both sides, decode's prefix, chunking, state and aux."""

    src_pages: np.ndarray
    dst_pages: np.ndarray  # decode's pages after the prefix
    prefix: int
    chunk: int
    state: dict[str, tuple[np.ndarray, np.ndarray]]
    aux: tuple[int, int] | None

    def chunks(self) -> list[ChunkIndices]:
        """Each prefill chunk, aligned; state and aux with the last."""
        n = self.src_pages.size
        offsets = list(range(0, n, self.chunk)) or [0]
        out = []
        for i, off in enumerate(offsets):
            last = i == len(offsets) - 1
            part = self.src_pages[off : off + self.chunk]
            out.append(
                align_chunk(part, off, self.dst_pages, self.prefix, last=last, state=self.state, aux=self.aux)
            )
        return out

    def pairs(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Every (source, destination) index pair the room moves, per index space."""
        out = {"kv": (self.src_pages[self.prefix :], self.dst_pages), **self.state}
        if self.aux is not None:
            out["aux"] = (np.array([self.aux[0]]), np.array([self.aux[1]]))
        return out


def expected(
    lay: RankLayout, initial: Mapping[str, np.ndarray], truth: Truth, room: Room
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Destination bytes after a direct gather/scatter of the room, and the mask of bytes moved."""
    out = {k: v.copy() for k, v in initial.items()}
    mask = {k: np.zeros(v.size, bool) for k, v in initial.items()}
    pairs = room.pairs()
    for b in lay.buffers():
        if b.space not in pairs:
            continue
        s_idx, d_idx = pairs[b.space]
        view = out[b.key].reshape(-1, b.rows, lay.row_bytes(b))
        mview = mask[b.key].reshape(-1, b.rows, lay.row_bytes(b))
        for k, s in enumerate(b.sections):
            lo, hi = lay.heads(s)
            off, size = lay.section_offset(b, k), lay.section_bytes(b, k)
            data = truth[b.key][k][s_idx][:, :, lo:hi].reshape(s_idx.size, b.rows, size)
            view[d_idx, :, off : off + size] = data
            mview[d_idx, :, off : off + size] = True
    return out, mask


def run_room(
    sources: Sequence[RankLayout],
    destinations: Sequence[RankLayout],
    items_src: Mapping[str, int],
    items_dst: Mapping[str, int],
    room: Room,
    seed: int = 0,
    joined: bool = False,
) -> tuple[list[Memory], list[WritePlan | None], Truth]:
    """Plan and execute the room into every destination; the destinations' memories and the plans.

    ``joined``: plan each rank pair's chunks all at once (:func:`join_indices`, as
    prefill's outbox does for a burst) instead of chunk by chunk.  Either way each
    plan must move what the route's ``moved_bytes`` says, in at most ``max_rows`` rows.
    """
    truth = logical_state(sources[0], items_src, seed)
    src_ranks = [
        RankRegions(s, synthetic_pool(s, items_src, base=(1 << 40) + i * (1 << 32), gap=64))
        for i, s in enumerate(sources)
    ]
    src_mem = [Memory(r) for r in src_ranks]
    for m in src_mem:
        m.fill_from(truth)
    dst_mem: list[Memory] = []
    plans: list[WritePlan | None] = []
    chunks = room.chunks()
    for j, d in enumerate(destinations):
        rank = RankRegions(d, synthetic_pool(d, items_dst, base=(1 << 44) + j * (1 << 32), gap=32))
        mem = Memory(rank)
        mem.fill_random(seed + 1 + j)
        table = assign(d, sources)
        for i, src in enumerate(src_ranks):
            mine = for_source(table, i)
            bound = route(src, rank, mine)
            batches: list[tuple[ChunkIndices | JoinedIndices, WritePlan | None]]
            if joined:
                burst = join_indices(chunks, bound.item_bytes)
                batches = [(burst, bound.writes(burst))]
            else:
                batches = [(c, plan_writes(src, rank, mine, c)) for c in chunks]
            for c, plan in batches:
                assert bound.moved_bytes(c) == (plan.nbytes if plan is not None else 0)
                assert bound.max_rows(c) >= sum(p.rows for p in (plan.parts if plan is not None else ()))
                plans.append(plan)
                if plan is not None:
                    execute(plan, src_mem[i], mem)
        dst_mem.append(mem)
    return dst_mem, plans, truth


def check_room(dst_mem: Sequence[Memory], truth: Truth, room: Room) -> None:
    """Every destination equals the direct gather/scatter; each moved byte written once, no other byte."""
    for mem in dst_mem:
        want, mask = expected(mem.rank.layout, mem.initial, truth, room)
        for key, got in mem.bytes.items():
            writes = mem.writes[key]
            assert writes.max(initial=0) <= 1, f"{key}: a byte written {writes.max()} times"
            np.testing.assert_array_equal(writes.astype(bool), mask[key], err_msg=f"{key}: bytes touched")
            np.testing.assert_array_equal(got, want[key], err_msg=f"{key}: bytes differ")
