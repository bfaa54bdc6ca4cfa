"""What a demo node fills and checks: a tensor pool's layers and aux, or a model preset's buffers.

Without ``--model`` a node's pool is a :class:`~kvroom.transport.layout.KVPool`
of opaque pages.  With ``--model NAME`` it is the preset's buffers
(:mod:`kvroom.presets`) as raw regions: every page buffer, every aux buffer
(one row index into all), and its state: one mamba row per request (its aux
slot) and sliding-window pages (the request's last pages), sent with the last
chunk.  Patterns depend on the room and the request page, so decode checks
every byte it was sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvroom.demo.workload import aux_matches, expected_pages, fill_aux, fill_pages

__all__ = ["DemoBuffers", "make_buffers"]

WINDOW_PAGES = 4
"""Sliding-window pages a request sends: its last ones."""


@dataclass
class DemoBuffers:
    """The tensors behind a node's pool, grouped the way the demo fills them."""

    pool: Any  # what KVManager takes: a KVPool or a RankRegions
    pages: list[torch.Tensor]
    aux: list[torch.Tensor]
    state: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page across every page buffer."""
        return sum(t[0].numel() * t.element_size() for t in self.pages)

    def state_indices(self, pages: torch.Tensor, slot: int) -> dict[str, list[int]] | None:
        """The request's state rows on this node (None when the model has no state)."""
        rows = {"mamba": [slot], "swa": pages[-WINDOW_PAGES:].tolist()}
        return {k: v for k, v in rows.items() if k in self.state} or None

    def fill(self, room: int, npages: int, pages: torch.Tensor, slot: int) -> None:
        """Prefill: write the room's pattern into its pages, aux rows and state rows."""
        fill_pages(self.pages, room, range(npages), pages)
        for aux in self.aux:
            fill_aux(aux, slot, room)
        for space, rows in (self.state_indices(pages, slot) or {}).items():
            fill_pages(self.state[space], room, range(len(rows)), torch.tensor(rows))

    def clear_rows(self, pages: torch.Tensor, slot: int) -> None:
        """Decode: zero the rows a room will receive, so a stale row cannot pass for a new one."""
        for aux in self.aux:
            aux[slot].zero_()
        for space, rows in (self.state_indices(pages, slot) or {}).items():
            for t in self.state[space]:
                t[torch.tensor(rows)] = 0

    def verify(self, room: int, first: int, npages: int, pages: torch.Tensor, slot: int) -> bool:
        """Decode: True when pages ``first..`` of the room, its aux and state rows arrived intact."""
        ok = expected_pages(self.pages, room, range(first, npages), pages[first:])
        ok = ok and all(aux_matches(aux, slot, room) for aux in self.aux)
        for space, rows in (self.state_indices(pages, slot) or {}).items():
            ok = ok and expected_pages(self.state[space], room, range(len(rows)), torch.tensor(rows))
        return bool(ok)


def make_buffers(
    model: str | None, pool_pages: int, aux_slots: int, layers: int, page_bytes: int
) -> DemoBuffers:
    """A node's buffers: a preset's (TP 1) when ``model`` is given, else opaque pages."""
    if model is None:
        from kvroom import KVPool

        tensors = [torch.zeros(pool_pages, page_bytes, dtype=torch.uint8) for _ in range(layers)]
        aux = torch.zeros(aux_slots, 64, dtype=torch.uint8)
        return DemoBuffers(KVPool(tensors, aux), tensors, [aux])
    from kvroom.planning import RankRegions
    from kvroom.presets import get_preset

    preset = get_preset(model)
    rank = preset.rank()
    regions, by_role = preset.pool(rank, pool_pages, aux_slots)
    spaces = {b.key: b.space for b in rank.buffers()}
    state: dict[str, list[torch.Tensor]] = {}
    pages = [t for k, t in by_role["kv"].items() if spaces[k] == "kv"]
    for group in ("kv", "state"):
        for key, t in by_role[group].items():
            if spaces[key] != "kv":
                state.setdefault(spaces[key], []).append(t)
    return DemoBuffers(RankRegions(rank, regions), pages, list(by_role["aux"].values()), state)
