"""WRITE plans: (source rank, destination rank, assignment, indices) -> descriptor arrays.

Pure numpy, no NIXL: :func:`plan_writes` returns, for one (source,
destination) pair and one chunk of one room, ``(addr, len, dev)`` uint64 rows
for the local (source) and remote (destination) side, row ``i`` of one
copying to row ``i`` of the other, grouped by memory kinds (a NIXL transfer
has one memory kind per side).  ``None`` when the pair moves nothing.

Within an item (a page, a state row, an aux row) the assigned heads of each
row and section are byte *spans*; spans contiguous on both sides merge.  When
one span covers the whole item on both sides (same slice of heads, or an
unsliced buffer), consecutive items coalesce into runs
(:func:`~kvroom.transport.descriptors.page_runs`): one descriptor per (buffer,
run).  Otherwise there is one descriptor per (buffer, item, span): per token
row when head slices interleave.  Buffers of equal geometry (the layers of a
model) are planned together, vectorised over their base addresses.

:func:`align_chunk` turns a prefill chunk (pages ``offset..`` of the request)
and decode's page list after its prefix into the page pairs to move; state
and aux indices ride with the last chunk.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from kvroom.planning.assign import Assignment
from kvroom.planning.layout import Buffer, RankLayout
from kvroom.planning.ranks import RankRegions
from kvroom.transport.descriptors import DescArray, IntArray, page_runs, run_descriptors
from kvroom.transport.regions import Region

__all__ = ["ChunkIndices", "WritePart", "WritePlan", "align_chunk", "item_spans", "plan_writes"]

IndexPair = tuple[IntArray, IntArray]
SpanArray = npt.NDArray[np.int64]
"""``(n, 3)`` spans inside an item: ``(src_offset, dst_offset, length)``."""


def _ints(values: object) -> IntArray:
    arr = np.asarray(values, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"indices must be one-dimensional, got shape {arr.shape}")
    return arr


@dataclass(frozen=True)
class ChunkIndices:
    """The items one chunk moves, per index space: source and destination index pairs.

    ``pages``: KV page pairs; ``state``: per state space (``"mamba"``,
    ``"swa"``), index pairs; ``aux``: the request's aux row on each side, or
    None.  ``first``: where ``pages[1][0]`` sits in decode's page list.
    """

    pages: IndexPair
    state: Mapping[str, IndexPair] = field(default_factory=dict)
    aux: tuple[int, int] | None = None
    first: int = 0

    def pairs(self, space: str) -> IndexPair | None:
        """The index pairs for ``space``, or None when this chunk has none."""
        if space == "kv":
            return self.pages
        if space == "aux":
            if self.aux is None:
                return None
            return np.array([self.aux[0]], np.int64), np.array([self.aux[1]], np.int64)
        return self.state.get(space)


def align_chunk(
    src_pages: object,
    offset: int,
    dst_pages: object,
    prefix_pages: int,
    *,
    last: bool = False,
    state: Mapping[str, tuple[object, object]] | None = None,
    aux: tuple[int, int] | None = None,
) -> ChunkIndices:
    """The pairs of one chunk: request pages ``offset..`` against decode's list after its prefix.

    ``src_pages`` are the chunk's prefill pages (request pages ``offset`` to
    ``offset + len``); ``dst_pages`` are decode's pages for request pages
    ``prefix_pages..``.  Pages decode already holds are skipped.  ``state``
    and ``aux`` are kept only when ``last``.
    """
    src = _ints(src_pages)
    dst = _ints(dst_pages)
    skip = min(src.size, max(0, prefix_pages - offset))
    src = src[skip:]
    first = offset + skip - prefix_pages
    if first + src.size > dst.size:
        raise ValueError(
            f"chunk at request page {offset} of {src.size + skip} pages runs past decode's "
            f"{dst.size} pages after a prefix of {prefix_pages}"
        )
    pairs: dict[str, IndexPair] = {}
    for space, (s, d) in (state or {}).items() if last else ():
        s_arr, d_arr = _ints(s), _ints(d)
        if s_arr.size != d_arr.size:
            raise ValueError(f"state {space!r}: {s_arr.size} source indices but {d_arr.size} destination")
        pairs[space] = (s_arr, d_arr)
    return ChunkIndices((src, dst[first : first + src.size]), pairs, aux if last else None, first)


@dataclass(frozen=True)
class WritePart:
    """Descriptor rows of one memory-kind pair: ``local[i]`` is copied to ``remote[i]``."""

    local_mem: str
    remote_mem: str
    local: DescArray
    remote: DescArray

    @property
    def rows(self) -> int:
        """Descriptor rows per side."""
        return int(self.local.shape[0])


@dataclass(frozen=True)
class WritePlan:
    """All WRITEs of one chunk from one source rank to one destination rank."""

    parts: tuple[WritePart, ...]

    @property
    def nbytes(self) -> int:
        """Bytes moved."""
        return sum(int(p.local[:, 1].sum()) for p in self.parts)

    @property
    def rows(self) -> int:
        """Descriptor rows per side."""
        return sum(p.rows for p in self.parts)


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


class _Placement(NamedTuple):
    """What buffers planned together share: index space, item geometry, memory."""

    space: str
    shape: tuple[object, ...]
    src_item: int
    dst_item: int
    src_mem: str
    src_device: int
    dst_mem: str
    dst_device: int


def _check_range(regions: list[Region], indices: IntArray, side: str) -> None:
    if indices.size == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    for region in regions:
        if low < 0 or high >= region.items:
            bad = low if low < 0 else high
            raise ValueError(f"{side} index {bad} outside region {region.name!r} of {region.items} items")


def _descriptors(bases: list[int], item: int, indices: IntArray, spans: SpanArray, device: int) -> DescArray:
    addr = (
        np.asarray(bases, np.uint64)[:, None, None]
        + indices.astype(np.uint64)[None, :, None] * np.uint64(item)
        + spans[:, 0].astype(np.uint64)[None, None, :]
    )
    out = np.empty((addr.size, 3), dtype=np.uint64)
    out[:, 0] = addr.ravel()
    out[:, 1] = np.broadcast_to(spans[:, 1].astype(np.uint64)[None, None, :], addr.shape).ravel()
    out[:, 2] = device
    return out


def plan_writes(
    source: RankRegions,
    destination: RankRegions,
    assignments: Iterable[Assignment],
    indices: ChunkIndices,
) -> WritePlan | None:
    """The WRITEs of ``assignments`` (this pair's entries) for the items in ``indices``.

    Raises ValueError when an index falls outside a region; None when nothing moves.
    """
    src_lay, dst_lay = source.layout, destination.layout
    model = dst_lay.model
    pieces: dict[str, list[tuple[int, tuple[int, int]]]] = {}
    for a in assignments:
        pieces.setdefault(a.key, []).append((a.section, a.heads))
    # buffers of one geometry and placement are planned together
    groups: dict[_Placement, tuple[list[Region], list[Region], SpanArray]] = {}
    spans_memo: dict[tuple[object, ...], SpanArray] = {}
    for key, parts in pieces.items():
        buffer = model.by_key[key]
        if indices.pairs(buffer.space) is None:
            continue
        src, dst = source.regions[key], destination.regions[key]
        shape = (buffer.rows, buffer.sections, buffer.dtype, tuple(parts))
        spans = spans_memo.get(shape)
        if spans is None:
            spans = spans_memo[shape] = item_spans(src_lay, dst_lay, buffer, parts)
        group = _Placement(
            buffer.space, shape, src.item_bytes, dst.item_bytes, src.mem, src.device, dst.mem, dst.device
        )
        if group not in groups:
            groups[group] = ([], [], spans)
        groups[group][0].append(src)
        groups[group][1].append(dst)
    out: dict[tuple[str, str], tuple[list[DescArray], list[DescArray]]] = {}
    for group, (srcs, dsts, spans) in groups.items():
        space, s_item, d_item = group.space, group.src_item, group.dst_item
        s_dev, d_dev = group.src_device, group.dst_device
        pair = indices.pairs(space)
        assert pair is not None
        s_idx, d_idx = pair
        if s_idx.size != d_idx.size:
            raise ValueError(f"{space}: {s_idx.size} source indices but {d_idx.size} destination indices")
        if s_idx.size == 0:
            continue
        _check_range(srcs, s_idx, "source")
        _check_range(dsts, d_idx, "destination")
        s_bases, d_bases = [r.addr for r in srcs], [r.addr for r in dsts]
        if spans.shape[0] == 1 and tuple(spans[0]) == (0, 0, s_item) and s_item == d_item:
            s_start, d_start, lengths = page_runs(s_idx, d_idx)
            local = run_descriptors(s_bases, s_item, s_start, lengths, s_dev)
            remote = run_descriptors(d_bases, d_item, d_start, lengths, d_dev)
        else:
            local = _descriptors(s_bases, s_item, s_idx, spans[:, [0, 2]], s_dev)
            remote = _descriptors(d_bases, d_item, d_idx, spans[:, [1, 2]], d_dev)
        lists = out.setdefault((group.src_mem, group.dst_mem), ([], []))
        lists[0].append(local)
        lists[1].append(remote)
    if not out:
        return None
    return WritePlan(
        tuple(WritePart(sm, dm, np.concatenate(ls), np.concatenate(rs)) for (sm, dm), (ls, rs) in out.items())
    )
