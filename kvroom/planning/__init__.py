"""Planning: layouts + page lists + state indices -> WRITE descriptor arrays (pure, no NIXL).

* :mod:`~kvroom.planning.layout`: the model's logical buffers and one rank's share of them.
* :mod:`~kvroom.planning.families`: buffer lists for attention, MLA, mamba state and aux rows.
* :mod:`~kvroom.planning.ranks`: a rank's layout bound to its registered regions (the handshake).
* :mod:`~kvroom.planning.assign`: which source rank writes which heads and layers of a destination.
* :mod:`~kvroom.planning.plan`: what a chunk moves (indices) and what it takes (descriptor rows).
* :mod:`~kvroom.planning.route`: a rank pair bound once, then a chunk's rows in a few numpy passes.
* :mod:`~kvroom.planning.staging`: decode's staging reservations as ranks, so staging is two plans.
"""

from kvroom.planning.assign import (
    Assignment,
    assign,
    for_source,
    group_ranks,
    stage_entries,
    writing_sources,
)
from kvroom.planning.families import attention_buffers, aux_buffers, draft_buffers, mamba_buffers
from kvroom.planning.layout import DTYPE_BYTES, Buffer, ModelLayout, RankLayout, Section, pp_layers, tp_heads
from kvroom.planning.plan import ChunkIndices, JoinedIndices, WritePart, WritePlan, align_chunk, join_indices
from kvroom.planning.ranks import RankRegions, from_kv_pool, synthetic_pool
from kvroom.planning.route import PairRoute, item_spans, plan_writes, route
from kvroom.planning.staging import staging_bytes, staging_rank, whole_share

__all__ = [
    "DTYPE_BYTES",
    "Assignment",
    "Buffer",
    "ChunkIndices",
    "JoinedIndices",
    "ModelLayout",
    "PairRoute",
    "RankLayout",
    "RankRegions",
    "Section",
    "WritePart",
    "WritePlan",
    "align_chunk",
    "assign",
    "attention_buffers",
    "aux_buffers",
    "draft_buffers",
    "for_source",
    "from_kv_pool",
    "group_ranks",
    "item_spans",
    "join_indices",
    "mamba_buffers",
    "plan_writes",
    "pp_layers",
    "route",
    "staging_bytes",
    "stage_entries",
    "staging_rank",
    "synthetic_pool",
    "tp_heads",
    "whole_share",
    "writing_sources",
]
