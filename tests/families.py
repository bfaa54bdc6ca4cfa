"""Model families as real rank processes over raw regions: GQA, MLA, pipeline stages, hybrid state.

Each rank carves its regions out of one byte arena (gaps between them, K and
V of a layer apart, several aux buffers), as an engine hands raw pointers;
:class:`FamilyServer` runs in a :class:`~tests.ranks.Rank` process.  Prefill
fills every item with a pattern of its *global* coordinates (buffer, source
item, row, global head, element), so decode can check each byte it received
against what the prefill item held, whatever the TP and PP split.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch

from kvroom.planning import (
    Buffer,
    ModelLayout,
    RankLayout,
    RankRegions,
    Section,
    attention_buffers,
    aux_buffers,
    mamba_buffers,
)
from kvroom.transport.regions import Region, RegionPool
from tests.ranks import RankServer

PAGES, ROWS, PAGE_SIZE, GAP = 32, 8, 2, 64
AUX = aux_buffers({"output_ids": 8, "hidden_states": 24})  # several aux rows, one index into all


def _family(name: str) -> ModelLayout:
    if name == "gqa":  # 2 KV heads: replicated on TP 4
        return ModelLayout(2, PAGE_SIZE, attention_buffers(range(2), PAGE_SIZE, 2, 8, "int32") + AUX)
    if name == "mla":  # one latent "head" on every rank
        kv = attention_buffers(range(2), PAGE_SIZE, 1, 24, "int32", names=("kv",))
        return ModelLayout(2, PAGE_SIZE, kv + AUX)
    if name == "pp":  # 4 layers over the stages
        return ModelLayout(4, PAGE_SIZE, attention_buffers(range(4), PAGE_SIZE, 4, 8, "int32") + AUX)
    if name == "hybrid":  # mamba rows at 0 and 2, full attention at 1, sliding window at 3
        conv = (Section(2, 6), Section(2, 6), Section(4, 6))
        state = mamba_buffers([0, 2], conv, (Section(4, 16),), "int32", "int32")
        full = attention_buffers([1], PAGE_SIZE, 2, 8, "int32")
        window = attention_buffers([3], PAGE_SIZE, 2, 8, "int32", names=("swa_k", "swa_v"), space="swa")
        return ModelLayout(4, PAGE_SIZE, full + state + window + AUX)
    raise ValueError(f"no family {name!r}")


def variant(name: str, field: str) -> ModelLayout:
    """The family's model with one field changed (for the handshake refusals)."""
    model = _family(name)
    if field == "layer count":
        return ModelLayout(model.layers + 1, model.page_size, model.buffers)
    changed: list[Buffer] = []
    for b in model.buffers:
        if b.role == "kv" and field in ("head_dim", "dtype", "total heads"):
            s = b.sections[0]
            dim, heads = (s.head_dim * 2, s.heads) if field == "head_dim" else (s.head_dim, s.heads * 2)
            b = Buffer(b.name, b.layer, b.space, b.rows, (Section(heads, dim),), b.dtype)
            if field == "dtype":
                b = Buffer(b.name, b.layer, b.space, b.rows, model.by_key[b.key].sections, "float32")
        if b.role == "state" and field == "state shapes":
            b = Buffer(b.name, b.layer, b.space, b.rows, (*b.sections[:-1], Section(8, 16)), b.dtype)
        changed.append(b)
    return ModelLayout(model.layers, model.page_size, tuple(changed))


def items_of(space: str) -> int:
    """Items per region of an index space."""
    return PAGES if space in ("kv", "swa") else ROWS


class Arena:
    """One byte arena with a region per buffer ``layout`` holds, ``GAP`` bytes apart."""

    def __init__(self, layout: RankLayout) -> None:
        spans = []
        offset = 0
        for b in layout.buffers():
            item = layout.item_bytes(b)
            spans.append((b, offset, item))
            offset += item * items_of(b.space) + GAP
        self.memory = torch.zeros(offset, dtype=torch.uint8)
        self.bytes = self.memory.numpy()
        base = int(self.memory.data_ptr())
        roles: dict[str, list[Region]] = {"kv": [], "aux": [], "state": []}
        self.spans: dict[str, tuple[int, int, int]] = {}
        for b, start, item in spans:
            roles[b.role].append(Region(b.key, base + start, item * items_of(b.space), item))
            self.spans[b.key] = (start, item, items_of(b.space))
        self.pool = RegionPool(tuple(roles["kv"]), tuple(roles["aux"]), tuple(roles["state"]))

    def items(self, key: str) -> np.ndarray:
        """The buffer's items as an ``[items, item_bytes]`` uint8 view."""
        start, item, count = self.spans[key]
        return self.bytes[start : start + item * count].reshape(count, item)


def pattern(layout: RankLayout, b: Buffer, items: np.ndarray) -> np.ndarray:
    """What prefill holds in items ``items`` of ``b`` for ``layout``'s heads, as ``[n, bytes]``."""
    cols = []
    for k, sec in enumerate(b.sections):
        lo, hi = layout.heads(sec)
        heads = np.arange(lo, hi).repeat(sec.head_dim)
        cols.append(heads * 37 + np.tile(np.arange(sec.head_dim), hi - lo) + k * 7)
    col = np.concatenate(cols)
    key = zlib.crc32(b.key.encode()) % 997
    rows = np.arange(b.rows)[None, :, None]
    vals = ((key * 131 + np.asarray(items, np.int64)[:, None, None]) * 31 + rows) * 1009 + col[None, None, :]
    if b.elem_bytes == 1:
        return (vals % 251).astype(np.uint8).reshape(len(items), -1)
    return (vals % 2**31).astype(np.int32).view(np.uint8).reshape(len(items), -1)


class FamilyServer(RankServer):
    """A rank of one family: a manager over an arena of raw regions."""

    def start(  # type: ignore[override]
        self, role: str, family: str, tp: tuple[int, int], pp: tuple[int, int] = (0, 1), **config: Any
    ) -> str:
        from kvroom import KVManager, ManagerConfig
        from kvroom.fsm import Deadlines

        self.stop()
        model = variant(family, config.pop("variant")) if "variant" in config else _family(family)
        self.layout = RankLayout(model, tp[0], tp[1], pp[0], pp[1])
        self.arena = Arena(self.layout)
        if role == "prefill":
            for b in self.layout.buffers():
                view = self.arena.items(b.key)
                view[:] = pattern(self.layout, b, np.arange(view.shape[0]))
        deadlines = Deadlines(*config.pop("deadlines", (10.0, 20.0, 10.0)))
        regions = RankRegions(self.layout, self.arena.pool)
        self.manager = KVManager(
            role, regions, config=ManagerConfig(deadlines=deadlines, **config), audit=False
        )
        return str(self.manager.bootstrap_addr)

    def receiver(  # type: ignore[override]
        self,
        room: int,
        addrs: list[str],
        dst: list[int],
        aux: int | None = None,
        prefix: int = 0,
        state: dict[str, list[int]] | None = None,
    ) -> None:
        from kvroom import KVReceiver

        rx = KVReceiver(self.manager, addrs, room)
        rx.init()
        rx.send_metadata(dst, aux_index=aux, decode_prefix_len=prefix * PAGE_SIZE, state_indices=state)
        self.rooms[room] = rx

    def send(self, room: int, pages: list[int], state: dict[str, list[int]] | None = None) -> None:  # type: ignore[override]
        self.rooms[room].send(pages, state_indices=state)

    def received(self, moved: dict[str, tuple[list[int], list[int]]]) -> list[str]:
        """Keys of buffers whose destination items differ from the source items' pattern.

        ``moved``: per index space, (source items, destination items).
        """
        bad = []
        for b in self.layout.buffers():
            if b.space not in moved:
                continue
            src, dst = moved[b.space]
            got = self.arena.items(b.key)[np.asarray(dst, np.int64)]
            if not np.array_equal(got, pattern(self.layout, b, np.asarray(src, np.int64))):
                bad.append(b.key)
        return bad

    def untouched(self, space: str, items: list[int]) -> bool:
        """True when the given items of every buffer of ``space`` are still zero."""
        return all(
            not self.arena.items(b.key)[np.asarray(items, np.int64)].any()
            for b in self.layout.buffers()
            if b.space == space
        )
