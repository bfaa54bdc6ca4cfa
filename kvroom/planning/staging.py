"""The staging case through the same mapping: a chunk of decode's staging ring as a rank.

When head slices interleave, prefill may WRITE whole pages of its own layout
into a reservation of decode's staging buffer (a few coalesced descriptors)
and decode scatters the heads it holds into its pages locally
(:mod:`kvroom.transport.staging`).  Both halves are plans of this package:

* :func:`staging_rank` is the reservation seen as a rank with the *source's*
  layout (same TP rank, same layers) whose page buffers are back to back in
  the reservation, ``pages`` slots each, in model order: what
  ``[layers, chunk_pages, page_size, src_heads, head_dim]`` means today.
* prefill -> staging: ``plan_writes(source, staged, whole_share(staged.layout), indices)``
  with slot numbers as destination pages: whole-page runs, because the
  geometry is the source's own.
* staging -> decode: ``plan_writes(staged, destination, entries, indices)``
  with the source's entries of the real :func:`~kvroom.planning.assign`
  table and slots as source pages: the local scatter, as descriptor rows.

Only page buffers (index space ``"kv"``) stage; state and aux rows are
always written in place.
"""

from __future__ import annotations

from kvroom.planning.assign import Assignment, assign
from kvroom.planning.layout import ModelLayout, RankLayout
from kvroom.planning.ranks import RankRegions
from kvroom.transport.regions import Region, RegionPool

__all__ = ["staging_bytes", "staging_rank", "whole_share"]


def _staged_layout(source: RankLayout, space: str) -> RankLayout:
    model = source.model
    buffers = tuple(b for b in source.buffers() if b.space == space)
    if not buffers:
        raise ValueError(f"rank tp {source.tp_rank} pp {source.pp_rank} holds no {space!r} buffers to stage")
    return RankLayout(
        ModelLayout(model.layers, model.page_size, buffers),
        source.tp_rank,
        source.tp_size,
        source.pp_rank,
        source.pp_size,
        source.layer_start,
        source.layer_end,
        holds_aux=False,
    )


def staging_bytes(source: RankLayout, pages: int, space: str = "kv") -> int:
    """Bytes a reservation for ``pages`` pages of ``source``'s share takes."""
    return pages * sum(source.item_bytes(b) for b in source.buffers() if b.space == space)


def staging_rank(
    source: RankLayout, base: int, pages: int, mem: str = "DRAM", device: int = 0, space: str = "kv"
) -> RankRegions:
    """The reservation at ``base`` holding ``pages`` pages of ``source``'s page buffers, as a rank."""
    staged = _staged_layout(source, space)
    roles: dict[str, list[Region]] = {"kv": [], "aux": [], "state": []}
    addr = base
    for b in staged.buffers():
        item = staged.item_bytes(b)
        roles[b.role].append(Region(b.key, addr, item * pages, item, mem, device))
        addr += item * pages
    return RankRegions(staged, RegionPool(tuple(roles["kv"]), (), tuple(roles["state"])))


def whole_share(staged: RankLayout) -> tuple[Assignment, ...]:
    """Every head of every buffer ``staged`` holds, from source 0: the prefill -> staging entries."""
    return assign(staged, [staged])
