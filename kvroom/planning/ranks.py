"""A rank's layout bound to its registered regions: what a peer sends in the handshake.

:class:`RankRegions` checks once that every buffer the rank holds has a
region of that name with the item size the layout implies (a
:class:`ValueError` naming the region otherwise), and that the region sits in
the pool role its buffer's index space implies.  :meth:`RankRegions.check_compatible`
is the handshake check between two sides (:class:`~kvroom.errors.IncompatiblePeerError`
naming the field).  :func:`from_kv_pool` describes today's
:class:`~kvroom.transport.layout.KVPool` this way.  :func:`synthetic_pool` lays regions out at made-up
addresses for a layout: what tests and benchmarks plan against without memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvroom.planning.families import attention_buffers, aux_buffers
from kvroom.planning.layout import ModelLayout, RankLayout
from kvroom.transport.regions import Region, RegionPool

if TYPE_CHECKING:
    from kvroom.transport.layout import KVPool

__all__ = ["RankRegions", "from_kv_pool", "synthetic_pool"]


@dataclass(frozen=True)
class RankRegions:
    """``layout`` with ``pool``: each held buffer's region, validated."""

    layout: RankLayout
    pool: RegionPool
    regions: dict[str, Region] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        named = self.pool.by_name()
        bound: dict[str, Region] = {}
        for buffer in self.layout.buffers():
            region = named.get(buffer.key)
            if region is None:
                raise ValueError(f"region {buffer.key!r}: the layout needs it, the pool lacks it")
            role = self.pool.role_of(buffer.key)
            if role != buffer.role:
                raise ValueError(
                    f"region {buffer.key!r}: registered as {role}, the layout says {buffer.role}"
                )
            want = self.layout.item_bytes(buffer)
            if region.item_bytes != want:
                raise ValueError(
                    f"region {buffer.key!r}: item size {region.item_bytes}, the layout says {want} "
                    f"(tp rank {self.layout.tp_rank} of {self.layout.tp_size})"
                )
            bound[buffer.key] = region
        object.__setattr__(self, "regions", bound)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the handshake."""
        return {"layout": self.layout.to_dict(), "pool": self.pool.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RankRegions:
        """Parse a peer's description; raises ValueError when malformed or inconsistent."""
        try:
            return cls(RankLayout.from_dict(data["layout"]), RegionPool.from_dict(data["pool"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed rank description: {exc}") from exc

    def items(self, space: str) -> int | None:
        """Items every held region of index ``space`` has (the smallest); None when none is held."""
        counts = [r.items for key, r in self.regions.items() if self.layout.model.by_key[key].space == space]
        return min(counts) if counts else None

    @property
    def spaces(self) -> frozenset[str]:
        """The index spaces of the buffers this rank holds."""
        return frozenset(b.space for b in self.layout.buffers())

    def check_compatible(self, peer: RankRegions, peer_name: str) -> None:
        """Raise :class:`~kvroom.errors.IncompatiblePeerError` unless ``peer`` serves the same model."""
        self.layout.model.check_compatible(peer.layout.model, peer_name)


def synthetic_pool(
    layout: RankLayout,
    items: Mapping[str, int],
    base: int = 1 << 32,
    mem: str = "DRAM",
    device: int = 0,
    gap: int = 0,
) -> RegionPool:
    """Regions for every buffer ``layout`` holds, back to back from ``base``.

    ``items`` gives the item count per index space (``{"kv": pages, "aux":
    rows, "mamba": rows}``); ``gap`` bytes separate consecutive regions.
    """
    roles: dict[str, list[Region]] = {"kv": [], "aux": [], "state": []}
    addr = base
    for buffer in layout.buffers():
        item = layout.item_bytes(buffer)
        region = Region(buffer.key, addr, item * items[buffer.space], item, mem, device)
        roles[buffer.role].append(region)
        addr = region.end + gap
    return RegionPool(tuple(roles["kv"]), tuple(roles["aux"]), tuple(roles["state"]))


def from_kv_pool(pool: KVPool) -> RankRegions:
    """Today's tensor pool as regions: its layer tensors as ``layer.i``, its aux tensor as ``aux``.

    K and V are layers of their own in a :class:`~kvroom.transport.layout.KVPool`,
    so the model has ``len(pool.layers)`` layers of one paged buffer each; the
    staging buffer is not a region the planner writes through (see
    :mod:`kvroom.planning.staging`).
    """
    lay = pool.layout
    buffers = attention_buffers(
        range(lay.layers), lay.page_size, lay.total_heads, lay.head_dim, lay.dtype, names=("layer",)
    ) + aux_buffers({"aux": lay.aux_slot_bytes})
    rank = RankLayout(ModelLayout(lay.layers, lay.page_size, buffers), lay.tp_rank, lay.tp_size)
    regions = pool.regions
    kv = tuple(
        Region(
            f"layer.{i}",
            base,
            regions.num_pages * lay.page_bytes,
            lay.page_bytes,
            regions.mem,
            regions.device,
        )
        for i, base in enumerate(regions.bases)
    )
    aux = Region(
        "aux", regions.aux_base, regions.aux_slots * lay.aux_slot_bytes, lay.aux_slot_bytes,
        regions.aux_mem, regions.aux_device,
    )  # fmt: skip
    return RankRegions(rank, RegionPool(kv, (aux,)))
