"""What a chunk moves (:class:`ChunkIndices`) and what moving it takes (:class:`WritePlan`).

A :class:`WritePlan` holds, for one (source, destination) pair and one chunk
of one room, ``(addr, len, dev)`` uint64 rows for the local (source) and
remote (destination) side, row ``i`` of one copying to row ``i`` of the
other, in parts by memory kinds (a NIXL transfer has one memory kind per
side).  :mod:`kvroom.planning.route` builds them.

:func:`align_chunk` turns a prefill chunk (pages ``offset..`` of the request)
and decode's page list after its prefix into the page pairs to move; state
and aux indices ride with the last chunk.  :func:`join_indices` joins several
chunks' pairs, so one pass plans a burst of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from kvroom.transport.descriptors import DescArray, IntArray

__all__ = ["ChunkIndices", "JoinedIndices", "WritePart", "WritePlan", "align_chunk", "join_indices"]

IndexPair = tuple[IntArray, IntArray]


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


@dataclass(frozen=True)
class JoinedIndices:
    """Several chunks' index pairs joined per space, to plan them in one pass (prefill's outbox)."""

    by_space: Mapping[str, IndexPair]

    def pairs(self, space: str) -> IndexPair | None:
        """The joined index pairs for ``space``, or None when no chunk has any."""
        return self.by_space.get(space)


def join_indices(chunks: Sequence[ChunkIndices], spaces: Iterable[str]) -> JoinedIndices:
    """``chunks`` joined per space of ``spaces``, in order: planning them is planning each."""
    out: dict[str, IndexPair] = {}
    for space in spaces:
        got = [p for c in chunks if (p := c.pairs(space)) is not None and p[0].size]
        if len(got) == 1:
            out[space] = got[0]
        elif got:
            out[space] = (np.concatenate([p[0] for p in got]), np.concatenate([p[1] for p in got]))
    return JoinedIndices(out)


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
    first = max(0, offset + skip - prefix_pages)  # 0 when the whole chunk is in decode's prefix
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
