"""What a demo node moves, stamps and checks: a model preset's buffers, or opaque pages.

With a preset (:mod:`kvroom.presets`, ``kvroom demo --model NAME``) a node's
pool is the preset's buffers on TP rank 0 of 1, registered as raw regions:
every KV page buffer, every aux buffer (one row index into all) and the state:
one mamba row per request (its aux slot) and sliding-window pages (the
request's last :data:`WINDOW_PAGES` pages, ``swa`` space).  Without one
(``--page-kib``, and the fault tests' :class:`~kvroom.demo.nodes.NodeOptions`)
it is a :class:`~kvroom.transport.layout.KVPool` of opaque uint8 pages.

Buffers of one index space and row size are views into one ``[tensors, items,
row_bytes]`` block, a :class:`Group`, each with its own
:class:`~kvroom.demo.workload.PagePattern`: prefill fills every row once and
per room stamps only the rows it sends; decode checks every byte of every row
it received (pages, aux rows and state rows), in a few numpy calls per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvroom.demo.workload import PagePattern

__all__ = ["WINDOW_PAGES", "Group", "DemoBuffers", "make_buffers"]

WINDOW_PAGES = 4
"""Sliding-window pages a request sends as state rows: its last ones."""

_BANK_BYTES = 64 << 20  # the most one group's pattern bank may hold


@dataclass
class Group:
    """Buffers of one index ``space`` and one row size, as views into one block."""

    space: str  # "kv", "swa", "aux" or "mamba"
    block: np.ndarray  # [tensors, items, row_bytes] uint8, zero-copy over the registered memory
    tensors: list[torch.Tensor]  # the block's tensors as registered (uint8 rows)
    pattern: PagePattern

    @classmethod
    def of(cls, space: str, big: torch.Tensor, seed: int) -> Group:
        """A group over ``big`` (``[tensors, items, row_bytes]`` uint8)."""
        n, _, row = big.shape
        rows = max(2, min(16, _BANK_BYTES // max(1, n * row)))
        return cls(space, big.numpy(), list(big.unbind(0)), PagePattern(n, row, seed=seed, bank_rows=rows))


class DemoBuffers:
    """A node's pool (what ``KVManager`` takes) and its groups."""

    def __init__(self, pool: Any, groups: list[Group], page_size: int) -> None:
        self.pool = pool
        self.groups = groups
        self.page_size = page_size  # tokens per page
        spaces = {g.space for g in groups}
        self.state_spaces = sorted(spaces & {"swa", "mamba"})
        kv = [g for g in groups if g.space == "kv"]
        self.page_bytes = sum(g.block.shape[0] * g.block.shape[2] for g in kv)
        """Bytes of one page over every KV page buffer."""
        self.raw_group = max(kv, key=lambda g: g.block.shape[0] * g.block.shape[2])
        """The KV group the raw NIXL comparison writes."""

    def state_indices(self, pages: torch.Tensor, slot: int) -> dict[str, list[int]] | None:
        """The request's state rows on this node (None when the pool has no state)."""
        rows = {"mamba": [slot], "swa": pages[-WINDOW_PAGES:].tolist()}
        return {k: rows[k] for k in self.state_spaces} or None

    def _rows(
        self, space: str, npages: int, first: int, pages: np.ndarray, slot: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(request rows, pool rows) of ``space`` a room moves: its pages from ``first``, or its rows."""
        if space == "kv":
            return np.arange(first, npages), pages[first:]
        if space == "swa":
            window = np.arange(max(0, npages - WINDOW_PAGES), npages)
            return window, pages[window]
        return np.zeros(1, np.int64), np.array([slot])  # aux and mamba: the request's row

    def prepare(self) -> None:
        """Prefill, once: every row of every group from its pattern bank."""
        for g in self.groups:
            g.pattern.prepare(g.block)

    def stamp(self, room: int, npages: int, first: int, pages: torch.Tensor, slot: int) -> None:
        """Prefill, per room: mark the pages from ``first``, aux and state rows it sends."""
        at = pages.numpy()
        for g in self.groups:
            request, rows = self._rows(g.space, npages, first, at, slot)
            g.pattern.stamp(g.block, room, request, rows)

    def clear(self, npages: int, first: int, pages: torch.Tensor, slot: int) -> None:
        """Decode: zero the stamps of the rows a room will receive (a row never written fails)."""
        at = pages.numpy()
        for g in self.groups:
            _, rows = self._rows(g.space, npages, first, at, slot)
            g.block[:, rows, : PagePattern.STAMP] = 0

    def check(self, room: int, npages: int, first: int, pages: torch.Tensor, slot: int) -> bool:
        """Decode: True when every byte of the room's pages, aux and state rows arrived intact."""
        at = pages.numpy()
        for g in self.groups:
            request, rows = self._rows(g.space, npages, first, at, slot)
            if not g.pattern.check(g.block, room, request, rows):
                return False
        return True


def _preset_buffers(
    model: str, layers: int | None, pool_pages: int, aux_slots: int, seed: int
) -> DemoBuffers:
    from kvroom.planning import RankRegions
    from kvroom.presets import get_preset
    from kvroom.transport.regions import RegionPool

    preset = get_preset(model, layers)
    rank = preset.rank()
    items = preset.items(pool_pages, aux_slots)
    by_group: dict[tuple[str, int], list[Any]] = {}
    for b in rank.buffers():
        by_group.setdefault((b.space, b.rows * rank.row_bytes(b)), []).append(b)
    tensors: dict[str, dict[str, torch.Tensor]] = {"kv": {}, "aux": {}, "state": {}}
    groups = []
    for (space, row), buffers in by_group.items():
        big = torch.zeros(len(buffers), items[space], row, dtype=torch.uint8)
        groups.append(Group.of(space, big, seed))
        for b, t in zip(buffers, big.unbind(0), strict=True):
            dtype = getattr(torch, b.dtype)
            if len(b.sections) == 1:
                lo, hi = rank.heads(b.sections[0])
                shape: tuple[int, ...] = (items[space], b.rows, hi - lo, b.sections[0].head_dim)
            else:
                shape = (items[space], b.rows, rank.row_bytes(b) // b.elem_bytes)
            tensors[b.role][b.key] = t.view(dtype).view(shape)
    regions = RegionPool.from_tensors(tensors["kv"], tensors["aux"], tensors["state"])
    return DemoBuffers(RankRegions(rank, regions), groups, preset.model.page_size)


def make_buffers(
    model: str | None,
    layers: int,
    pool_pages: int,
    aux_slots: int,
    page_bytes: int,
    aux_bytes: int,
    seed: int = 0,
) -> DemoBuffers:
    """A node's buffers: preset ``model`` (``layers`` > 0 overrides its count), else opaque pages."""
    if model is not None:
        return _preset_buffers(model, layers or None, pool_pages, aux_slots, seed)
    from kvroom import KVPool

    kv = Group.of("kv", torch.zeros(layers, pool_pages, page_bytes, dtype=torch.uint8), seed)
    aux = Group.of("aux", torch.zeros(1, aux_slots, aux_bytes, dtype=torch.uint8), seed)
    return DemoBuffers(KVPool(kv.tensors, aux.tensors[0]), [kv, aux], 1)
