"""A rank pair's route: its entries bound to regions once, then a plan per chunk in numpy.

Within an item (a page, a state row, an aux row) the assigned heads of each
row and section are byte *spans*; spans contiguous on both sides merge.  When
one span covers the whole item on both sides (same slice of heads, or an
unsliced buffer such as an MLA latent or an aux row), consecutive items
coalesce into runs (:func:`~kvroom.transport.descriptors.page_runs`): one
descriptor per (buffer, run).  Otherwise there is one descriptor per (buffer,
item, span): per token row when head slices interleave.

Everything that depends only on the two ranks and the assignment (spans,
base addresses, item sizes, devices, memory kinds) is worked out once in
:func:`route`; :meth:`PairRoute.writes` then costs a few numpy operations per
group of buffers (all whole-item buffers of one index space and memory-kind
pair form one group; span buffers group by geometry), whatever the layer count.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kvroom.planning.assign import Assignment
from kvroom.planning.layout import Buffer, RankLayout
from kvroom.planning.plan import ChunkIndices, JoinedIndices, WritePart, WritePlan
from kvroom.planning.ranks import RankRegions
from kvroom.transport.descriptors import DescArray, IntArray, page_runs
from kvroom.transport.regions import Region

__all__ = ["PairRoute", "SpanArray", "item_spans", "plan_writes", "route"]

SpanArray = npt.NDArray[np.int64]
"""``(n, 3)`` spans inside an item: ``(src_offset, dst_offset, length)``."""
U64 = npt.NDArray[np.uint64]


def item_spans(
    source: RankLayout, destination: RankLayout, buffer: Buffer, pieces: Iterable[tuple[int, tuple[int, int]]]
) -> SpanArray:
    """``(src_offset, dst_offset, length)`` rows inside one item for the assigned ``pieces``.

    ``pieces`` are ``(section, (lo, hi))`` global head ranges; spans are row
    major and merged where contiguous on both sides.
    """
    src_off, dst_off, length = [], [], []
    hb = [s.head_dim * buffer.elem_bytes for s in buffer.sections]
    for k, (lo, hi) in pieces:
        section = buffer.sections[k]
        src_off.append(source.section_offset(buffer, k) + (lo - source.heads(section)[0]) * hb[k])
        dst_off.append(destination.section_offset(buffer, k) + (lo - destination.heads(section)[0]) * hb[k])
        length.append((hi - lo) * hb[k])
    rows = np.arange(buffer.rows, dtype=np.int64)[:, None]
    spans = np.empty((buffer.rows * len(length), 3), dtype=np.int64)
    spans[:, 0] = (rows * source.row_bytes(buffer) + np.asarray(src_off, np.int64)[None, :]).ravel()
    spans[:, 1] = (rows * destination.row_bytes(buffer) + np.asarray(dst_off, np.int64)[None, :]).ravel()
    spans[:, 2] = np.broadcast_to(np.asarray(length, np.int64)[None, :], (buffer.rows, len(length))).ravel()
    ends = spans[:-1, :2] + spans[:-1, 2:3]
    breaks = np.flatnonzero(~((ends[:, 0] == spans[1:, 0]) & (ends[:, 1] == spans[1:, 1]))) + 1
    starts = np.concatenate(([0], breaks))
    merged = spans[starts].copy()
    merged[:, 2] = np.add.reduceat(spans[:, 2], starts)
    return merged


def _u64(values: list[int]) -> U64:
    return np.asarray(values, dtype=np.uint64)


@dataclass(frozen=True)
class _Group:
    """Buffers planned in one numpy pass: same index space and memory kinds (and spans)."""

    space: str
    src_mem: str
    dst_mem: str
    spans: SpanArray | None  # None: whole items, coalesced into runs
    src_bases: U64
    dst_bases: U64
    src_items: U64  # bytes per item, per buffer
    dst_items: U64
    src_devices: U64
    dst_devices: U64
    src_smallest: Region  # for the range check and its message
    dst_smallest: Region
    single: bool = False  # one buffer each side, addresses that int64 arithmetic holds


def _group(space: str, spans: SpanArray | None, srcs: list[Region], dsts: list[Region]) -> _Group:
    return _Group(
        space,
        srcs[0].mem,
        dsts[0].mem,
        spans,
        _u64([r.addr for r in srcs]),
        _u64([r.addr for r in dsts]),
        _u64([r.item_bytes for r in srcs]),
        _u64([r.item_bytes for r in dsts]),
        _u64([r.device for r in srcs]),
        _u64([r.device for r in dsts]),
        min(srcs, key=lambda r: r.items),
        min(dsts, key=lambda r: r.items),
        len(srcs) == 1 and max(srcs[0].end, dsts[0].end) < 2**62,
    )


def _rows(addr: U64, length: U64, device: U64) -> DescArray:
    out = np.empty((*addr.shape, 3), dtype=np.uint64)
    out[..., 0] = addr
    out[..., 1] = length  # broadcast in the assignment: no temporaries
    out[..., 2] = device
    return out.reshape(-1, 3)


def _joined(arrays: list[DescArray]) -> DescArray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _one_buffer(g: _Group, runs: tuple[IntArray, IntArray, IntArray]) -> tuple[DescArray, DescArray]:
    """A single whole-item buffer's run descriptors, in int64 then viewed (the per-chunk hot path)."""
    s_start, d_start, lengths = runs
    s_base, s_item, s_dev, d_base, d_item, d_dev = (
        int(g.src_bases[0]), int(g.src_items[0]), int(g.src_devices[0]),
        int(g.dst_bases[0]), int(g.dst_items[0]), int(g.dst_devices[0]),
    )  # fmt: skip
    nbytes = lengths * s_item
    local = np.empty((s_start.size, 3), dtype=np.int64)
    local[:, 0] = s_start * s_item + s_base
    local[:, 1] = nbytes
    local[:, 2] = s_dev
    remote = np.empty((d_start.size, 3), dtype=np.int64)
    remote[:, 0] = d_start * d_item + d_base
    remote[:, 1] = nbytes
    remote[:, 2] = d_dev
    return local.view(np.uint64), remote.view(np.uint64)


def _check(region: Region, indices: IntArray, side: str) -> None:
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= region.items:
        bad = low if low < 0 else high
        raise ValueError(f"{side} index {bad} outside region {region.name!r} of {region.items} items")


def _per_item(amounts: dict[str, int], indices: ChunkIndices | JoinedIndices) -> int:
    """The sum over index spaces of ``amounts[space]`` times the items ``indices`` move in it."""
    total = 0
    for space, per_item in amounts.items():
        pair = indices.pairs(space)
        if pair is not None:
            total += int(pair[0].size) * per_item
    return total


class PairRoute:
    """The fixed part of every plan from one source rank to one destination rank."""

    def __init__(self, groups: list[_Group]) -> None:
        self._groups = groups
        self.item_bytes: dict[str, int] = {}  # bytes moved per item, per index space
        self.item_rows: dict[str, int] = {}  # descriptor rows per item at most (runs make fewer)
        for g in groups:
            per_buffer = int(g.spans[:, 2].sum()) if g.spans is not None else None
            moved = len(g.src_bases) * per_buffer if per_buffer is not None else int(g.src_items.sum())
            rows = len(g.src_bases) * (len(g.spans) if g.spans is not None else 1)
            self.item_bytes[g.space] = self.item_bytes.get(g.space, 0) + moved
            self.item_rows[g.space] = self.item_rows.get(g.space, 0) + rows
        self.mems = frozenset((g.src_mem, g.dst_mem) for g in groups)  # memory-kind pairs (one part each)

    def max_rows(self, indices: ChunkIndices | JoinedIndices) -> int:
        """At most how many descriptor rows (per side) :meth:`writes` gives for ``indices``."""
        return _per_item(self.item_rows, indices)

    def moved_bytes(self, indices: ChunkIndices | JoinedIndices) -> int:
        """The bytes :meth:`writes` would move for ``indices`` (without planning them)."""
        return _per_item(self.item_bytes, indices)

    @property
    def empty(self) -> bool:
        """True when the source writes nothing into the destination (it only takes part in the verdict)."""
        return not self._groups

    @property
    def spaces(self) -> frozenset[str]:
        """The index spaces this pair moves items of (``kv``, ``aux``, state spaces)."""
        return frozenset(g.space for g in self._groups)

    @property
    def interleaved(self) -> bool:
        """True when some page buffer moves per-row spans (head slices interleave).

        These are the pairs whose pages may go through decode's staging ring
        (:mod:`kvroom.planning.staging`) instead of one descriptor per row.
        """
        return any(g.spans is not None and g.space == "kv" for g in self._groups)

    def writes(self, indices: ChunkIndices | JoinedIndices) -> WritePlan | None:
        """The WRITEs of the chunk ``indices``; None when nothing moves.

        Raises ValueError when an index falls outside a region or a space's
        source and destination lists differ in length.
        """
        out: dict[tuple[str, str], tuple[list[DescArray], list[DescArray]]] = {}
        runs: dict[str, tuple[IntArray, IntArray, IntArray]] = {}
        for g in self._groups:
            pair = indices.pairs(g.space)
            if pair is None or (pair[0].size == 0 and pair[1].size == 0):
                continue
            s_idx, d_idx = pair
            if s_idx.size != d_idx.size:
                raise ValueError(
                    f"{g.space}: {s_idx.size} source indices but {d_idx.size} destination indices"
                )
            _check(g.src_smallest, s_idx, "source")
            _check(g.dst_smallest, d_idx, "destination")
            if g.spans is None:
                if g.space not in runs:
                    runs[g.space] = page_runs(s_idx, d_idx)
                if g.single:  # one buffer (an opaque pool, an aux row): 1-D, per chunk
                    local, remote = _one_buffer(g, runs[g.space])
                else:
                    s_start, d_start, lengths = (a.astype(np.uint64)[None, :] for a in runs[g.space])
                    length = lengths * g.src_items[:, None]
                    local = _rows(
                        g.src_bases[:, None] + s_start * g.src_items[:, None], length, g.src_devices[:, None]
                    )
                    remote = _rows(
                        g.dst_bases[:, None] + d_start * g.dst_items[:, None], length, g.dst_devices[:, None]
                    )
            else:
                spans = g.spans.astype(np.uint64)
                length = spans[None, None, :, 2]
                s_addr = (
                    g.src_bases[:, None, None]
                    + s_idx.astype(np.uint64)[None, :, None] * g.src_items[:, None, None]
                )
                d_addr = (
                    g.dst_bases[:, None, None]
                    + d_idx.astype(np.uint64)[None, :, None] * g.dst_items[:, None, None]
                )
                local = _rows(s_addr + spans[None, None, :, 0], length, g.src_devices[:, None, None])
                remote = _rows(d_addr + spans[None, None, :, 1], length, g.dst_devices[:, None, None])
            lists = out.setdefault((g.src_mem, g.dst_mem), ([], []))
            lists[0].append(local)
            lists[1].append(remote)
        if not out:
            return None
        parts = (WritePart(sm, dm, _joined(ls), _joined(rs)) for (sm, dm), (ls, rs) in out.items())
        return WritePlan(tuple(parts))


def route(source: RankRegions, destination: RankRegions, assignments: Iterable[Assignment]) -> PairRoute:
    """Bind this pair's entries of an :func:`~kvroom.planning.assign` table to both sides' regions.

    ``assignments`` are the entries whose ``source`` is this source rank
    (:func:`~kvroom.planning.for_source`).  Build once per rank pair; the
    route does not depend on rooms.
    """
    src_lay, dst_lay = source.layout, destination.layout
    model = dst_lay.model
    pieces: dict[str, list[tuple[int, tuple[int, int]]]] = {}
    for a in assignments:
        pieces.setdefault(a.key, []).append((a.section, a.heads))
    spans_memo: dict[tuple[object, ...], SpanArray] = {}
    members: dict[tuple[object, ...], tuple[SpanArray | None, list[Region], list[Region]]] = {}
    for key, parts in pieces.items():
        buffer = model.by_key[key]
        src, dst = source.regions[key], destination.regions[key]
        shape = (buffer.rows, buffer.sections, buffer.dtype, tuple(parts))
        spans = spans_memo.get(shape)
        if spans is None:
            spans = spans_memo[shape] = item_spans(src_lay, dst_lay, buffer, parts)
        whole = spans.shape[0] == 1 and tuple(spans[0]) == (0, 0, src.item_bytes) == (0, 0, dst.item_bytes)
        group: tuple[object, ...] = (buffer.space, src.mem, dst.mem)
        if not whole:  # span groups share one geometry: item sizes and spans
            group += (shape, src.item_bytes, dst.item_bytes)
        entry = members.setdefault(group, (None if whole else spans, [], []))
        entry[1].append(src)
        entry[2].append(dst)
    return PairRoute([_group(str(k[0]), spans, srcs, dsts) for k, (spans, srcs, dsts) in members.items()])


def plan_writes(
    source: RankRegions,
    destination: RankRegions,
    assignments: Iterable[Assignment],
    indices: ChunkIndices,
) -> WritePlan | None:
    """The WRITEs of this pair's ``assignments`` for the items in ``indices``: ``route(...).writes(indices)``.

    Build the :class:`PairRoute` once per rank pair and reuse it where chunks
    are many: binding costs more than a chunk.  Raises ValueError when an
    index falls outside a region; None when nothing moves.
    """
    return route(source, destination, assignments).writes(indices)
