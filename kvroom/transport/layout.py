"""KV pool layout: what is registered with NIXL and exchanged in the handshake.

A pool is one contiguous tensor per layer, indexed by page on its first
dimension, plus an aux tensor with one metadata slot per request on its first
dimension.  CPU tensors register as DRAM, CUDA tensors as VRAM, through the
same code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kvroom.errors import IncompatiblePeerError

__all__ = ["KVLayout", "KVPool", "Regions"]


def _mem(t: torch.Tensor) -> tuple[str, int]:
    return ("VRAM", t.device.index or 0) if t.is_cuda else ("DRAM", 0)


@dataclass(frozen=True)
class KVLayout:
    """What must agree between two peers before any room is accepted."""

    layers: int
    page_bytes: int
    dtype: str
    aux_slot_bytes: int
    page_size: int = 1  # tokens per page

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the control plane."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVLayout:
        """Parse a peer's layout; raises ValueError when malformed."""
        try:
            layout = cls(
                layers=int(data["layers"]),
                page_bytes=int(data["page_bytes"]),
                dtype=str(data["dtype"]),
                aux_slot_bytes=int(data["aux_slot_bytes"]),
                page_size=int(data["page_size"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed layout {data!r}: {exc}") from exc
        if min(layout.layers, layout.page_bytes, layout.aux_slot_bytes, layout.page_size) <= 0:
            raise ValueError(f"malformed layout {data!r}: sizes must be positive")
        return layout

    def check_compatible(self, peer: KVLayout, peer_name: str) -> None:
        """Raise :class:`IncompatiblePeerError` naming every mismatching field."""
        diffs = [
            f"{name}: ours {mine!r}, theirs {theirs!r}"
            for name, mine, theirs in (
                ("layers", self.layers, peer.layers),
                ("page_bytes", self.page_bytes, peer.page_bytes),
                ("dtype", self.dtype, peer.dtype),
                ("aux_slot_bytes", self.aux_slot_bytes, peer.aux_slot_bytes),
                ("page_size", self.page_size, peer.page_size),
            )
            if mine != theirs
        ]
        if diffs:
            raise IncompatiblePeerError(f"peer {peer_name} has an incompatible KV layout: {'; '.join(diffs)}")


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

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the control plane."""
        return {**asdict(self), "bases": list(self.bases)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Regions:
        """Parse a peer's regions; raises ValueError when malformed."""
        try:
            regions = cls(
                bases=tuple(int(b) for b in data["bases"]),
                num_pages=int(data["num_pages"]),
                mem=str(data["mem"]),
                device=int(data["device"]),
                aux_base=int(data["aux_base"]),
                aux_slots=int(data["aux_slots"]),
                aux_mem=str(data["aux_mem"]),
                aux_device=int(data["aux_device"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed regions: {exc}") from exc
        if regions.mem not in ("DRAM", "VRAM") or regions.aux_mem not in ("DRAM", "VRAM"):
            raise ValueError("malformed regions: unknown memory type")
        return regions


class KVPool:
    """The KV pages and aux slots of one process, validated once.

    ``layers``: one contiguous tensor per layer, shape ``[num_pages, ...]``, all
    of one dtype, shape and device.  ``aux``: a contiguous tensor of shape
    ``[num_slots, ...]``.
    """

    def __init__(self, layers: Sequence[torch.Tensor], aux: torch.Tensor, *, page_size: int = 1) -> None:
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
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.layers = layers
        self.aux = aux
        self.num_pages = int(first.shape[0])
        self.page_bytes = int(first[0].numel() * first.element_size())
        self.aux_slots = int(aux.shape[0])
        self.aux_slot_bytes = int(aux[0].numel() * aux.element_size())
        self.layout = KVLayout(
            layers=len(layers),
            page_bytes=self.page_bytes,
            dtype=str(first.dtype).removeprefix("torch."),
            aux_slot_bytes=self.aux_slot_bytes,
            page_size=page_size,
        )
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
        )

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor to register with NIXL."""
        return [*self.layers, self.aux]
