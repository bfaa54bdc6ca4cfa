"""Who writes what in a room, as each side acts on it: the planner's answers, put to work.

* Decode: :func:`decode_sources` turns the :func:`~kvroom.planning.assign`
  table over every prefill rank into one :class:`Source` per rank: whether it
  writes here at all (the others only take part in the verdict), whether it
  writes pages (and so is counted per page), and whether its pages go through
  the staging ring; :class:`Source` then tracks its WRITEs' notifications.
* Prefill: :func:`direct_writes` and :func:`staged_writes` turn one chunk of
  a room (:class:`~kvroom.planning.ChunkIndices`) for one decode rank into
  :class:`ChunkWrite` s: a cached :class:`~kvroom.planning.PairRoute`'s plan,
  one WRITE per memory-kind pair, or whole local pages into decode's staging
  reservations (:func:`~kvroom.planning.staging_rank`).

Only the first WRITE of a chunk counts its pages; state and aux rows ride
with the last chunk and count none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from kvroom.planning import (
    ChunkIndices,
    PairRoute,
    RankLayout,
    RankRegions,
    WritePlan,
    assign,
    for_source,
    route,
    staging_rank,
    whole_share,
)
from kvroom.transport.descriptors import DescArray, IntArray, validate_pages
from kvroom.transport.staging import chunk_pages

__all__ = [
    "ChunkWrite",
    "DeferredWrite",
    "Source",
    "decode_sources",
    "deferred_writes",
    "direct_writes",
    "kv_heads",
    "staged_writes",
    "state_rows",
]


@dataclass
class Source:
    """One prefill rank's share of a decode room, and how far it got."""

    writes: bool  # it WRITEs into this rank (else it only takes part in the verdict)
    pages: bool  # it writes page buffers: each of the room's pages counts once from it
    staged: bool  # its pages go through the staging ring
    heads: tuple[int, int] | None = None  # staged: the global heads it writes here
    src_heads: tuple[int, int] | None = None  # staged: the heads it holds
    seen: set[int] = field(default_factory=set)  # notification sequence numbers arrived
    chunk_got: dict[int, int] = field(default_factory=dict)  # staged pages arrived per chunk
    pages_got: int = 0
    total: int | None = None  # WRITEs of its share, known from its last notification
    finished: bool = False  # every WRITE it makes arrived: it can write no more
    commits: bool = False  # a notification of it committed the room (it is the room's only rank)

    @property
    def ended(self) -> bool:
        """Its last notification arrived (others may still be on their way)."""
        return self.total is not None


def kv_heads(layout: RankLayout) -> tuple[int, int] | None:
    """The heads ``layout`` holds of its first page buffer (None when it holds none)."""
    for b in layout.buffers():
        if b.space == "kv":
            return layout.heads(b.sections[0])
    return None


def decode_sources(
    mine: RankLayout,
    layouts: Sequence[RankLayout],
    stages: Callable[[RankLayout], bool],
) -> list[Source]:
    """Each prefill rank's :class:`Source` for this decode rank, from the assignment over all of them.

    ``stages(source)`` says whether that source's pages, if it writes any, go
    through the staging ring.  Raises :class:`~kvroom.errors.IncompatiblePeerError`
    when some buffer this rank needs has no source.
    """
    table = assign(mine, layouts)
    model = mine.model
    out: list[Source] = []
    for i, layout in enumerate(layouts):
        entries = for_source(table, i)
        page_entries = tuple(a for a in entries if model.by_key[a.key].space == "kv")
        staged = bool(page_entries) and stages(layout)
        heads = page_entries[0].heads if staged else None
        out.append(
            Source(bool(entries), bool(page_entries), staged, heads, kv_heads(layout) if staged else None)
        )
    return out


class ChunkWrite(NamedTuple):
    """One WRITE to post: descriptor rows on both sides, and what its notification says."""

    local: DescArray
    local_mem: str
    remote: DescArray
    remote_mem: str
    start: int  # first page of the decode rank's page list it fills
    npages: int  # pages it completes (0: state or aux rows, or another part of the chunk)


def _parts(plan: WritePlan | None, start: int, npages: int) -> list[ChunkWrite]:
    if plan is None:
        return []
    return [
        ChunkWrite(p.local, p.local_mem, p.remote, p.remote_mem, start, npages if k == 0 else 0)
        for k, p in enumerate(plan.parts)
    ]


class DeferredWrite(NamedTuple):
    """A chunk's one WRITE into a single-memory-kind route, planned later with others (the outbox)."""

    route: PairRoute
    indices: ChunkIndices
    local_mem: str
    remote_mem: str
    start: int
    npages: int
    nbytes: int
    rows: int  # descriptor rows per side, at most


def deferred_writes(pair: PairRoute, indices: ChunkIndices) -> list[DeferredWrite] | None:
    """The chunk as one :class:`DeferredWrite` ([] when nothing moves); None when the route has
    several memory-kind pairs (plan it now with :func:`direct_writes`)."""
    if len(pair.mems) != 1:
        return None
    nbytes = pair.moved_bytes(indices)
    if not nbytes:
        return []
    ((local_mem, remote_mem),) = pair.mems
    npages = int(indices.pages[1].size) if "kv" in pair.spaces else 0
    rows = pair.max_rows(indices)
    return [DeferredWrite(pair, indices, local_mem, remote_mem, indices.first, npages, nbytes, rows)]


def direct_writes(pair: PairRoute, indices: ChunkIndices) -> list[ChunkWrite]:
    """The chunk's WRITEs straight into the decode rank's regions (ValueError on a bad index)."""
    npages = int(indices.pages[1].size) if "kv" in pair.spaces else 0  # rows only: no pages count
    return _parts(pair.writes(indices), indices.first, npages)


def staged_writes(
    mine: RankRegions,
    pair: PairRoute,
    indices: ChunkIndices,
    offsets: Sequence[int],
    chunk_size: int,
    total_pages: int,
    base: int,
    unit_bytes: int,
    mem: str,
    device: int,
) -> list[ChunkWrite]:
    """The chunk's pages as whole local pages into decode's staging chunks; state and aux direct.

    ``offsets``: the ring unit offset of each staging chunk of ``chunk_size``
    pages of the decode rank's ``total_pages``; the ring starts at ``base``.
    """
    src, lo = indices.pages[0], indices.first
    writes: list[ChunkWrite] = []
    if src.size:
        for c in range(lo // chunk_size, (lo + src.size - 1) // chunk_size + 1):
            j0, j1 = max(lo, c * chunk_size), min(lo + int(src.size), (c + 1) * chunk_size)
            slots = np.arange(j0 - c * chunk_size, j1 - c * chunk_size, dtype=np.int64)
            staged = staging_rank(
                mine.layout,
                base + offsets[c] * unit_bytes,
                chunk_pages(total_pages, chunk_size, c),
                mem,
                device,
            )
            plan = route(mine, staged, whole_share(staged.layout)).writes(
                ChunkIndices((src[j0 - lo : j1 - lo], slots))
            )
            writes += _parts(plan, j0, j1 - j0)
    empty = np.zeros(0, np.int64)
    rows = ChunkIndices((empty, empty), indices.state, indices.aux, indices.first)
    return writes + _parts(pair.writes(rows), lo, 0)


def state_rows(state_indices: object, regions: RankRegions, what: str) -> dict[str, IntArray]:
    """A scheduler's ``state_indices`` as validated rows per state index space this rank holds.

    ``state_indices``: ``{space: indices}`` (``"mamba"`` rows, ``"swa"``
    pages, ...), or one index list when the model has a single state space.
    Spaces of the model this rank holds none of (another pipeline stage's)
    are dropped; an unknown space, or a row outside a region, is a ValueError.
    """
    model_spaces = {b.space for b in regions.layout.model.buffers} - {"kv", "aux"}
    if state_indices is None:
        return {}
    if not model_spaces:
        raise ValueError(f"{what}: state_indices given, but the model has no state buffers")
    if isinstance(state_indices, Mapping):
        given = dict(state_indices)
    elif len(model_spaces) == 1:
        given = {next(iter(model_spaces)): state_indices}
    else:
        raise ValueError(
            f"{what}: state_indices must be a dict keyed by state space ({sorted(model_spaces)}) "
            "when the model has several"
        )
    out: dict[str, IntArray] = {}
    for space, rows in given.items():
        if space not in model_spaces:
            raise ValueError(f"{what}: no state space {space!r} in the model (it has {sorted(model_spaces)})")
        items = regions.items(space)
        if items is not None:
            out[space] = validate_pages(rows, items, f"{what} state {space!r}")
    return out
