"""A deterministic workload: rooms, their sizes, and the bytes of every page.

Page contents are a pure function of (room, request page, layer), so a decode
process can verify what arrived without seeing prefill's memory.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

__all__ = ["RoomSpec", "make_rooms", "fill_pages", "expected_pages", "fill_aux", "PageAllocator"]


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


def _pattern(room: int, pages: torch.Tensor, layer: int, width: int) -> torch.Tensor:
    base = (room * 131 + layer * 7) % 251
    col = torch.arange(width, dtype=torch.int64)
    return ((pages.to(torch.int64)[:, None] * 17 + col[None, :] + base) % 251).to(torch.uint8)


def fill_pages(layers: list[torch.Tensor], room: int, request_pages: range, slots: torch.Tensor) -> None:
    """Write the pattern of ``request_pages`` of ``room`` into pool ``slots``."""
    req = torch.tensor(list(request_pages), dtype=torch.int64)
    for layer, tensor in enumerate(layers):
        view = tensor.view(tensor.shape[0], -1).view(torch.uint8)
        view[slots] = _pattern(room, req, layer, view.shape[1])


def expected_pages(layers: list[torch.Tensor], room: int, request_pages: range, slots: torch.Tensor) -> bool:
    """True when pool ``slots`` hold exactly the pattern of ``request_pages``."""
    req = torch.tensor(list(request_pages), dtype=torch.int64)
    for layer, tensor in enumerate(layers):
        view = tensor.view(tensor.shape[0], -1).view(torch.uint8)
        if not torch.equal(view[slots], _pattern(room, req, layer, view.shape[1])):
            return False
    return True


def fill_aux(aux: torch.Tensor, slot: int, room: int) -> None:
    """Aux slot contents of a room (its id, repeated)."""
    row = aux[slot].view(-1).view(torch.uint8)
    row[:] = _pattern(room, torch.tensor([10**6]), 99, row.numel())[0]


def aux_matches(aux: torch.Tensor, slot: int, room: int) -> bool:
    """True when the aux slot holds the room's aux contents."""
    row = aux[slot].view(-1).view(torch.uint8)
    return torch.equal(row, _pattern(room, torch.tensor([10**6]), 99, row.numel())[0])


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
        self.free.extend(int(p) for p in pages)
