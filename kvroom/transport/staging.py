"""The decode-side staging ring, its per-room reservations, and the local scatter.

When head slices of prefill and decode pages interleave (tensor-parallel sizes
differ and pages hold more than one token), prefill WRITEs whole pages of its
own layout into a reserved region of decode's registered staging buffer with
a few coalesced descriptors, and decode scatters the heads it holds into its
destination pages with one torch indexing op per layer.

Space is a bounded ring of units (one head of one page of one layer).  A
reservation belongs to ``(room, chunk, session)`` in the ``prefetch_requested``
store; the store frees the ring space whenever an entry leaves it, including
the Failed cleanup, so a failed or aborted room can never pin the ring.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

import torch

from kvroom.fsm.stores import KeyedStore

__all__ = ["Reservation", "StagingRing", "StagingStore", "chunk_count", "chunk_pages", "scatter_chunk"]


def chunk_count(pages: int, size: int) -> int:
    """How many staging chunks of ``size`` pages a share of ``pages`` pages takes."""
    return -(-pages // size)


def chunk_pages(pages: int, size: int, chunk: int) -> int:
    """Pages in staging chunk ``chunk`` of a ``pages``-page share (the last may be short).

    A chunk's reservation holds ``[layers, chunk_pages, page_size, src_heads,
    head_dim]``: prefill writes, and decode scatters, by this one rule.
    """
    return min(size, pages - chunk * size)


@dataclass(frozen=True)
class Reservation:
    """``units`` contiguous units of the ring starting at ``offset``."""

    offset: int
    units: int


class StagingRing:
    """A bounded, thread-safe allocator of contiguous unit ranges (next fit).

    Allocation starts where the previous one ended and wraps around, so space
    is used as a ring; frees merge with their neighbours.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._starts: list[int] = [0] if capacity else []  # free extents, sorted
        self._lengths: list[int] = [capacity] if capacity else []
        self._cursor = 0
        self.used = 0

    @property
    def free(self) -> int:
        """Units not reserved."""
        return self.capacity - self.used

    def largest_free(self) -> int:
        """The largest reservation that would succeed now."""
        with self._lock:
            return max(self._lengths, default=0)

    def alloc(self, units: int) -> Reservation | None:
        """Reserve ``units`` contiguous units, or None when no extent is large enough."""
        if units <= 0:
            raise ValueError(f"units must be positive, got {units}")
        with self._lock:
            n = len(self._starts)
            first = bisect.bisect_left(self._starts, self._cursor)
            for k in range(n):
                i = (first + k) % n
                if self._lengths[i] >= units:
                    offset = self._starts[i]
                    if self._lengths[i] == units:
                        del self._starts[i], self._lengths[i]
                    else:
                        self._starts[i] += units
                        self._lengths[i] -= units
                    self.used += units
                    self._cursor = (offset + units) % self.capacity
                    return Reservation(offset, units)
            return None

    def release(self, res: Reservation) -> None:
        """Return a reservation's units (each reservation exactly once)."""
        with self._lock:
            i = bisect.bisect_left(self._starts, res.offset)
            end = res.offset + res.units
            if (i < len(self._starts) and self._starts[i] < end) or (
                i > 0 and self._starts[i - 1] + self._lengths[i - 1] > res.offset
            ):
                raise RuntimeError(f"{res} released twice or never allocated")
            self._starts.insert(i, res.offset)
            self._lengths.insert(i, res.units)
            if i + 1 < len(self._starts) and end == self._starts[i + 1]:  # merge right
                self._lengths[i] += self._lengths.pop(i + 1)
                del self._starts[i + 1]
            if i > 0 and self._starts[i - 1] + self._lengths[i - 1] == res.offset:  # merge left
                self._lengths[i - 1] += self._lengths.pop(i)
                del self._starts[i]
            self.used -= res.units


class StagingStore(KeyedStore[Reservation]):
    """``prefetch_requested``: reservations keyed ``(room, chunk, session)``.

    Every way out of the store (pop, the room's cleanup) gives the space back,
    through the store's :meth:`~kvroom.fsm.stores.KeyedStore.removed` hook.
    """

    def __init__(self, name: str, ring: StagingRing) -> None:
        super().__init__(name)
        self.ring = ring

    def removed(self, value: Reservation) -> None:
        """Give a reservation's space back to the ring."""
        self.ring.release(value)


def scatter_chunk(
    staging: torch.Tensor,
    unit_bytes: int,
    res: Reservation,
    src_heads: int,
    dst_layers: list[torch.Tensor],
    dst_pages: torch.Tensor,
    first: int,
    src_slice: slice,
    dst_slice: slice,
) -> None:
    """Copy heads ``src_slice`` of staged pages ``first..`` into ``dst_slice`` of ``dst_pages``.

    The reservation holds ``[layers, chunk_pages, page_size, src_heads, head_dim]``
    in the destination dtype; ``dst_layers`` are ``[pages, page_size, heads, dim]`` views.
    """
    sample = dst_layers[0]
    page_size, head_dim = int(sample.shape[1]), int(sample.shape[3])
    pages = res.units // (len(dst_layers) * src_heads)
    start = res.offset * unit_bytes
    raw = staging[start : start + res.units * unit_bytes]
    staged = raw.view(sample.dtype).view(len(dst_layers), pages, page_size, src_heads, head_dim)
    n = int(dst_pages.numel())
    for layer, view in enumerate(dst_layers):
        view[dst_pages, :, dst_slice] = staged[layer, first : first + n, :, src_slice]
