"""KV pool layout: what is registered with NIXL and exchanged in the handshake.

A pool is one contiguous tensor per layer (K and V of a layer are simply two
"layers"), indexed by page on its first dimension, plus an aux tensor with one
metadata slot per request, plus, on decode, an optional uint8 staging buffer.

A page holds ``page_size`` tokens; each token holds this rank's ``kv_heads``
heads of ``head_dim`` elements, so a layer tensor is
``[num_pages, page_size, kv_heads, head_dim]`` (token-major, as in SGLang's
paged pools).  Tensor-parallel rank ``r`` of ``tp_size`` holds heads
``[r * kv_heads, (r + 1) * kv_heads)`` of ``kv_heads * tp_size`` in all.  A pool
built without ``kv_heads`` treats each page as opaque: one "head" spanning the
token row, tensor parallel size 1.

CPU tensors register as DRAM, CUDA tensors as VRAM, through the same code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from kvroom.errors import IncompatiblePeerError

__all__ = ["KVLayout", "KVPool", "Regions", "head_overlap", "range_overlap"]


def _mem(t: torch.Tensor) -> tuple[str, int]:
    return ("VRAM", t.device.index or 0) if t.is_cuda else ("DRAM", 0)


@dataclass(frozen=True)
class KVLayout:
    """One rank's KV layout; peers exchange it in the handshake.

    ``layers``, ``page_size`` (tokens), ``head_dim``, ``dtype``, the total head
    count and ``aux_slot_bytes`` must agree between peers; ``kv_heads``,
    ``tp_rank`` and ``tp_size`` may differ (heterogeneous tensor parallelism).
    """

    layers: int
    page_size: int
    kv_heads: int
    head_dim: int
    dtype: str
    elem_bytes: int
    aux_slot_bytes: int
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def head_bytes(self) -> int:
        """Bytes of one head of one token."""
        return self.head_dim * self.elem_bytes

    @property
    def row_bytes(self) -> int:
        """Bytes of one token of one layer (all of this rank's heads)."""
        return self.kv_heads * self.head_bytes

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of one layer."""
        return self.page_size * self.row_bytes

    @property
    def total_heads(self) -> int:
        """KV heads of the whole model, across all tensor-parallel ranks."""
        return self.kv_heads * self.tp_size

    @property
    def heads(self) -> tuple[int, int]:
        """The global head range ``[lo, hi)`` this rank holds."""
        return self.tp_rank * self.kv_heads, (self.tp_rank + 1) * self.kv_heads

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the control plane."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVLayout:
        """Parse a peer's layout; raises ValueError when malformed."""
        try:
            values = {f.name: data[f.name] for f in fields(cls)}
            parsed: dict[str, Any] = {k: (str(v) if k == "dtype" else _int(v)) for k, v in values.items()}
            layout = cls(**parsed)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed layout {data!r}: {exc}") from exc
        sizes = (layout.layers, layout.page_size, layout.kv_heads, layout.head_dim, layout.elem_bytes)
        if min(*sizes, layout.aux_slot_bytes, layout.tp_size) <= 0:
            raise ValueError(f"malformed layout {data!r}: sizes must be positive")
        if not 0 <= layout.tp_rank < layout.tp_size:
            raise ValueError(f"malformed layout {data!r}: tp_rank outside [0, tp_size)")
        return layout

    def check_compatible(self, peer: KVLayout, peer_name: str) -> None:
        """Raise :class:`IncompatiblePeerError` naming every mismatching field."""
        diffs = [
            f"{name}: ours {mine!r}, theirs {theirs!r}"
            for name, mine, theirs in (
                ("layers", self.layers, peer.layers),
                ("page_size", self.page_size, peer.page_size),
                ("head_dim", self.head_dim, peer.head_dim),
                ("dtype", self.dtype, peer.dtype),
                ("total_heads", self.total_heads, peer.total_heads),
                ("aux_slot_bytes", self.aux_slot_bytes, peer.aux_slot_bytes),
            )
            if mine != theirs
        ]
        if diffs:
            raise IncompatiblePeerError(f"peer {peer_name} has an incompatible KV layout: {'; '.join(diffs)}")


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an int, got {value!r}")
    return value


def range_overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    """The common part of two head ranges ``[lo, hi)``, or None."""
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


def head_overlap(a: KVLayout, b: KVLayout) -> tuple[int, int] | None:
    """The global heads ``[lo, hi)`` both ranks hold, or None."""
    return range_overlap(a.heads, b.heads)


@dataclass(frozen=True)
class Regions:
    """Addresses a peer needs to WRITE into a pool."""

    bases: tuple[int, ...]
    num_pages: int
    mem: str
    device: int
    aux_base: int
    aux_slots: int
    aux_mem: str
    aux_device: int
    staging_base: int = 0
    staging_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the control plane."""
        return {**asdict(self), "bases": list(self.bases)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Regions:
        """Parse a peer's regions; raises ValueError when malformed."""
        try:
            parsed: dict[str, Any] = {
                f.name: _int(data[f.name]) if f.type == "int" else str(data[f.name])
                for f in fields(cls)
                if f.name != "bases"
            }
            regions = cls(bases=tuple(_int(b) for b in data["bases"]), **parsed)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed regions: {exc}") from exc
        if regions.mem not in ("DRAM", "VRAM") or regions.aux_mem not in ("DRAM", "VRAM"):
            raise ValueError("malformed regions: unknown memory type")
        if min(regions.num_pages, regions.aux_slots) <= 0 or regions.staging_bytes < 0:
            raise ValueError("malformed regions: sizes must be positive")
        return regions


class KVPool:
    """The KV pages, aux slots and staging buffer of one rank, validated once.

    ``layers``: one contiguous tensor per layer, all of one dtype, shape and
    device; ``[num_pages, page_size, kv_heads, head_dim]`` when ``kv_heads`` is
    given, else ``[num_pages, ...]`` with opaque pages.  ``aux``: a contiguous
    ``[num_slots, ...]`` tensor.  ``staging_pages``: decode only, room for that
    many local pages of KV (all layers) in the staging ring used when head
    slices of prefill and decode do not line up.
    """

    def __init__(
        self,
        layers: Sequence[torch.Tensor],
        aux: torch.Tensor,
        *,
        page_size: int = 1,
        kv_heads: int | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        staging_pages: int = 0,
    ) -> None:
        if isinstance(layers, torch.Tensor):
            layers = list(layers.unbind(0)) if layers.dim() >= 2 else [layers]
        layers = list(layers)
        if not layers:
            raise ValueError("a KV pool needs at least one layer tensor")
        for i, t in enumerate([*layers, aux]):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"pool tensor {i} is a {type(t).__name__}, not a torch.Tensor")
        first = layers[0]
        for i, t in enumerate(layers):
            if t.dim() < 1 or t.shape[0] == 0:
                raise ValueError(f"layer {i}: expected shape [num_pages, ...], got {tuple(t.shape)}")
            if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
                raise ValueError(
                    f"layer {i} is {tuple(t.shape)} {t.dtype} on {t.device}; "
                    f"layer 0 is {tuple(first.shape)} {first.dtype} on {first.device}"
                )
            if not t.is_contiguous():
                raise ValueError(f"layer {i} is not contiguous")
        if aux.dim() < 1 or aux.shape[0] == 0 or not aux.is_contiguous():
            raise ValueError(f"aux must be a contiguous [num_slots, ...] tensor, got {tuple(aux.shape)}")
        for name, value in (("page_size", page_size), ("tp_size", tp_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(tp_rank, bool) or not isinstance(tp_rank, int) or not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be in [0, {tp_size}), got {tp_rank!r}")
        if isinstance(staging_pages, bool) or not isinstance(staging_pages, int) or staging_pages < 0:
            raise ValueError(f"staging_pages must be a non-negative int, got {staging_pages!r}")
        page_elems = first[0].numel()
        if kv_heads is None:
            if tp_size != 1:
                raise ValueError(
                    "a tensor-parallel pool needs kv_heads (layers shaped [pages, tokens, heads, dim])"
                )
            if page_elems % page_size:
                raise ValueError(f"a page of {page_elems} elements does not split into {page_size} tokens")
            kv_heads, head_dim = 1, page_elems // page_size
        else:
            if first.dim() != 4 or tuple(first.shape[1:3]) != (page_size, kv_heads):
                raise ValueError(
                    f"layers must be [num_pages, page_size={page_size}, kv_heads={kv_heads}, head_dim], "
                    f"got {tuple(first.shape)}"
                )
            head_dim = int(first.shape[3])
        self.layers = layers
        self.aux = aux
        self.num_pages = int(first.shape[0])
        self.aux_slots = int(aux.shape[0])
        self.aux_slot_bytes = int(aux[0].numel() * aux.element_size())
        self.layout = KVLayout(
            layers=len(layers),
            page_size=page_size,
            kv_heads=kv_heads,
            head_dim=head_dim,
            dtype=str(first.dtype).removeprefix("torch."),
            elem_bytes=first.element_size(),
            aux_slot_bytes=self.aux_slot_bytes,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )
        self.page_bytes = self.layout.page_bytes
        # one unit of staging = one head of one page of one layer
        self.staging_unit_bytes = page_size * self.layout.head_bytes
        self.staging_units = staging_pages * kv_heads * len(layers)
        staging_bytes = self.staging_units * self.staging_unit_bytes
        self.staging = torch.zeros(staging_bytes, dtype=torch.uint8, device=first.device)
        self.mem, self.device = _mem(first)
        self.aux_mem, self.aux_device = _mem(aux)
        self.regions = Regions(
            bases=tuple(int(t.data_ptr()) for t in layers),
            num_pages=self.num_pages,
            mem=self.mem,
            device=self.device,
            aux_base=int(aux.data_ptr()),
            aux_slots=self.aux_slots,
            aux_mem=self.aux_mem,
            aux_device=self.aux_device,
            staging_base=int(self.staging.data_ptr()) if self.staging_units else 0,
            staging_bytes=int(self.staging.numel()),
        )

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor to register with NIXL."""
        return [*self.layers, self.aux, *([self.staging] if self.staging_units else [])]

    def page_view(self, layer: int) -> torch.Tensor:
        """Layer ``layer`` as ``[num_pages, page_size, kv_heads, head_dim]``."""
        lay = self.layout
        return self.layers[layer].view(self.num_pages, lay.page_size, lay.kv_heads, lay.head_dim)
