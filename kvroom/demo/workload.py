"""A deterministic workload: rooms, their sizes, and the bytes of every page.

Page contents are a pure function of (room, request page, tensor)
(:class:`PagePattern`), so a decode process can verify what arrived without
seeing prefill's memory.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "RoomSpec",
    "make_rooms",
    "PagePattern",
    "PageAllocator",
]


@dataclass(frozen=True)
class RoomSpec:
    """One request: room id, its pages, decode's cached prefix, its decode process."""

    room: int
    pages: int
    prefix_pages: int
    decode: int  # index of the decode process serving it


def make_rooms(
    count: int, decodes: int, min_pages: int, max_pages: int, seed: int, first_room: int = 1000
) -> list[RoomSpec]:
    """``count`` rooms of varied lengths spread over ``decodes`` processes."""
    if min_pages > max_pages:
        raise ValueError("min_pages must not exceed max_pages")
    rng = random.Random(seed)
    rooms = []
    for i in range(count):
        pages = rng.randint(min_pages, max_pages)
        prefix = rng.choice([0, 0, 0, rng.randint(0, pages)])
        rooms.append(RoomSpec(first_room + i, pages, prefix, i % decodes))
    return rooms


class PagePattern:
    """Page contents made once per process and checked exactly, at memory speed.

    A bank of ``bank_rows`` random pages per pool tensor is drawn once from
    ``seed`` (the same on every process).  :meth:`prepare` fills every page of
    prefill's pool once: slot ``s`` of tensor ``t`` holds bank row
    ``s % bank_rows`` of tensor ``t`` (its "KV").  Per room prefill only
    :meth:`stamp` marks the first 16 bytes of each page it sends with (room,
    request page, tensor, source slot).  Decode :meth:`check` reads every byte: the
    stamp must name this room, page and tensor, and the rest must equal the
    bank row of the source slot it names.  A page of another room, a stale
    page, a shifted or partial write all fail.  Everything is a few vectorised
    numpy calls over all tensors (numpy's gathers run at memory speed here,
    several times faster than torch's CPU kernels for uint8).  Decode compares
    in place, without gathered copies.

    ``pool``: the pool's tensors as one ``[tensors, pages, page_bytes]`` uint8
    array (a zero-copy numpy view of the registered memory).
    """

    STAMP = 16  # bytes: int64 room << 24 | request page, int64 source slot << 16 | tensor

    def __init__(self, tensors: int, page_bytes: int, seed: int = 0, bank_rows: int = 16) -> None:
        if page_bytes % 8 or page_bytes < 2 * self.STAMP:
            raise ValueError("page bytes must be a multiple of 8 and hold a 16-byte stamp")
        rng = np.random.default_rng(seed)
        self.bank = rng.integers(0, 256, (tensors, bank_rows, page_bytes), dtype=np.uint8)
        self.rows = bank_rows
        self.tensors = tensors
        self.page_bytes = page_bytes
        self._tensor_ids = np.arange(tensors, dtype=np.int64)[:, None]
        self._bank64 = self.bank.view(np.uint64)

    def prepare(self, pool: np.ndarray) -> None:
        """Prefill, once: every slot's body from the bank."""
        slots = np.arange(pool.shape[1]) % self.rows
        # mode="clip": with out= and the default "raise", numpy copies through a temporary
        np.take(self.bank, slots, axis=1, out=pool, mode="clip")

    def _stamps(self, room: int, request_pages: np.ndarray, slots: np.ndarray) -> np.ndarray:
        req = np.asarray(request_pages, dtype=np.int64)
        src = np.asarray(slots, dtype=np.int64)
        stamps = np.empty((self.tensors, req.size, 2), "<i8")
        stamps[:, :, 0] = (room << 24) | req[None, :]
        stamps[:, :, 1] = (src[None, :] << 16) | self._tensor_ids
        return stamps

    def stamp(self, pool: np.ndarray, room: int, request_pages: np.ndarray, slots: np.ndarray) -> None:
        """Prefill, per room: mark pool pages ``slots`` as ``request_pages`` of ``room``."""
        stamps = self._stamps(room, request_pages, slots).view(np.uint8)
        pool[:, np.asarray(slots), : self.STAMP] = stamps

    def check(self, pool: np.ndarray, room: int, request_pages: np.ndarray, slots: np.ndarray) -> bool:
        """Decode: True when pool pages ``slots`` hold exactly ``request_pages`` of ``room``.

        Compares in place, page by page in 8-byte words (no gathered copies: the
        check reads each received byte once and writes almost nothing, so it
        leaves the memory bandwidth to the transfers).
        """
        slots = np.asarray(slots)
        if slots.size == 0:
            return True
        head = pool[:, slots, : self.STAMP].copy().view("<i8")  # [tensors, n, 2]
        src = head[0, :, 1] >> 16  # the prefill slot each page says it came from
        if src.min() < 0 or not np.array_equal(head, self._stamps(room, request_pages, src)):
            return False
        words, bank, skip = pool.view(np.uint64), self._bank64, self.STAMP // 8
        for slot, row in zip(slots.tolist(), (src % self.rows).tolist(), strict=True):
            if not np.array_equal(words[:, slot, skip:], bank[:, row, skip:]):
                return False
        return True


class PageAllocator:
    """A free list of page indices (what a scheduler's KV allocator does)."""

    def __init__(self, size: int, rng: random.Random | None = None) -> None:
        self.free = list(range(size))
        (rng or random.Random(0)).shuffle(self.free)

    def alloc(self, n: int) -> torch.Tensor | None:
        """``n`` pages (a mix of runs and scattered pages), or None when short."""
        if n > len(self.free):
            return None
        taken, self.free = self.free[:n], self.free[n:]
        return torch.tensor(sorted(taken), dtype=torch.int64)

    def release(self, pages: torch.Tensor) -> None:
        """Give pages back."""
        self.free.extend(pages.tolist())  # not a tensor iteration: one Python int per page, fast
