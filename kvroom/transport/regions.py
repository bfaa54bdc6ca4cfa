"""Registered memory regions: what a pool *is* to NIXL and to a peer.

Engines hand a transfer backend raw memory, not tidy tensors: SGLang's
``KVArgs`` carries pointers, lengths and item lengths for KV buffers (K and V
of a layer in separate buffers, draft-model buffers with other item sizes),
for ~a dozen aux buffers of different row sizes, and for state buffers
(mamba conv/ssm rows, sliding-window pages).  A :class:`RegionPool` is that
description: named :class:`Region` s grouped by role, each a contiguous run of
equally sized items (a page, or a row) in one kind of memory on one device.

Regions are validated once, at construction: a zero length, a length that is
not a whole number of items, an unknown memory kind, a duplicate name or two
regions that overlap raise :class:`ValueError` naming the region(s).  Torch
tensors are one way to make regions (:meth:`RegionPool.from_tensors`: CPU
tensors are DRAM, CUDA tensors VRAM); the pool never needs torch otherwise.

Which logical buffer a region holds is said by its name; the planner
(:mod:`kvroom.planning`) binds names to a rank's layout.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["MEM_KINDS", "ROLES", "Region", "RegionPool"]

MEM_KINDS = ("DRAM", "VRAM")
"""Memory kinds NIXL registers: host memory and device memory."""

ROLES = ("kv", "aux", "state")
"""The roles a region plays in a pool, as SGLang's ``KVArgs`` groups them."""


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an int, got {value!r}")
    return value


@dataclass(frozen=True)
class Region:
    """One registered buffer: ``length`` bytes at ``addr``, items of ``item_bytes``.

    ``item_bytes`` is the size of one index step: a page of one KV buffer, a
    row of an aux or state buffer.  ``mem`` is ``"DRAM"`` or ``"VRAM"``;
    ``device`` the GPU ordinal (0 for DRAM).
    """

    name: str
    addr: int
    length: int
    item_bytes: int
    mem: str = "DRAM"
    device: int = 0

    def __post_init__(self) -> None:
        label = f"region {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a region needs a non-empty name, got {self.name!r}")
        for what in ("addr", "length", "item_bytes", "device"):
            _int(getattr(self, what), f"{label}: {what}")
        if self.addr < 0 or self.device < 0:
            raise ValueError(f"{label}: negative address or device ({self.addr}, {self.device})")
        if self.length <= 0:
            raise ValueError(f"{label}: zero length")
        if self.item_bytes <= 0:
            raise ValueError(f"{label}: item size must be positive, got {self.item_bytes}")
        if self.length % self.item_bytes:
            raise ValueError(
                f"{label}: length {self.length} is not a multiple of its item size {self.item_bytes}"
            )
        if self.mem not in MEM_KINDS:
            raise ValueError(f"{label}: memory kind must be one of {MEM_KINDS}, got {self.mem!r}")

    @property
    def items(self) -> int:
        """How many items (pages or rows) the region holds."""
        return self.length // self.item_bytes

    @property
    def end(self) -> int:
        """One past the region's last byte."""
        return self.addr + self.length

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the control plane."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Region:
        """Parse a peer's region; raises ValueError when malformed."""
        try:
            values = {f.name: data[f.name] for f in fields(cls)}
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed region {data!r}: missing {exc}") from exc
        if not isinstance(values["name"], str) or not isinstance(values["mem"], str):
            raise ValueError(f"malformed region {data!r}: name and mem must be strings")
        return cls(**values)


@dataclass(frozen=True)
class RegionPool:
    """One rank's registered regions, grouped by role (``kv``, ``aux``, ``state``).

    Region names are unique across the pool and no two regions overlap.
    """

    kv: tuple[Region, ...] = ()
    aux: tuple[Region, ...] = ()
    state: tuple[Region, ...] = ()

    def __post_init__(self) -> None:
        for role in ROLES:
            regions = getattr(self, role)
            if not isinstance(regions, tuple) or not all(isinstance(r, Region) for r in regions):
                raise ValueError(f"{role} regions must be a tuple of Region, got {regions!r}")
        seen: set[str] = set()
        for region in self:
            if region.name in seen:
                raise ValueError(f"region {region.name!r} is named twice")
            seen.add(region.name)
        ordered = sorted(self, key=lambda r: (r.mem, r.device, r.addr))
        for a, b in itertools.pairwise(ordered):
            if (a.mem, a.device) == (b.mem, b.device) and b.addr < a.end:
                raise ValueError(
                    f"region {b.name!r} [{b.addr:#x}, {b.end:#x}) overlaps region "
                    f"{a.name!r} [{a.addr:#x}, {a.end:#x})"
                )

    def __iter__(self) -> Iterator[Region]:
        """Every region, kv first, then aux, then state."""
        yield from self.kv
        yield from self.aux
        yield from self.state

    def __len__(self) -> int:
        """The number of regions."""
        return len(self.kv) + len(self.aux) + len(self.state)

    def by_name(self) -> dict[str, Region]:
        """Regions keyed by name."""
        return {r.name: r for r in self}

    def role_of(self, name: str) -> str:
        """The role (``kv``, ``aux`` or ``state``) of the region called ``name``."""
        for role in ROLES:
            if any(r.name == name for r in getattr(self, role)):
                return role
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the control plane."""
        return {role: [r.to_dict() for r in getattr(self, role)] for role in ROLES}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RegionPool:
        """Parse a peer's pool; raises ValueError when malformed (or its regions are bad)."""
        if not isinstance(data, Mapping) or set(data) - set(ROLES):
            raise ValueError(f"malformed region pool: expected roles {ROLES}, got {data!r}")
        parsed: dict[str, tuple[Region, ...]] = {}
        for role in ROLES:
            entries = data.get(role, [])
            if not isinstance(entries, list | tuple):
                raise ValueError(f"malformed region pool: {role} is {entries!r}")
            parsed[role] = tuple(Region.from_dict(e) for e in entries)
        return cls(**parsed)

    @classmethod
    def from_tensors(
        cls,
        kv: Mapping[str, torch.Tensor],
        aux: Mapping[str, torch.Tensor] | None = None,
        state: Mapping[str, torch.Tensor] | None = None,
    ) -> RegionPool:
        """Regions over contiguous tensors indexed by item on their first dimension.

        A ``[items, ...]`` tensor becomes a region of ``items`` items of
        ``tensor[0]``'s bytes; CPU tensors are DRAM, CUDA tensors VRAM on
        their device.  The caller keeps the tensors alive while registered.
        """
        groups: dict[str, tuple[Region, ...]] = {}
        for role, tensors in (("kv", kv), ("aux", aux or {}), ("state", state or {})):
            regions = []
            for name, t in tensors.items():
                if t.dim() < 1 or t.shape[0] == 0:
                    raise ValueError(f"region {name!r}: expected a [items, ...] tensor, got {tuple(t.shape)}")
                if not t.is_contiguous():
                    raise ValueError(f"region {name!r}: tensor is not contiguous")
                length = t.numel() * t.element_size()
                mem, device = ("VRAM", t.device.index or 0) if t.is_cuda else ("DRAM", 0)
                regions.append(Region(name, int(t.data_ptr()), length, length // t.shape[0], mem, device))
            groups[role] = tuple(regions)
        return cls(**groups)
