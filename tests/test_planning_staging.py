"""Staging as two plans: prefill -> staging reservation -> decode pages, same bytes as direct."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvroom.planning import (
    ChunkIndices,
    ModelLayout,
    RankLayout,
    RankRegions,
    align_chunk,
    assign,
    for_source,
    plan_writes,
    staging_bytes,
    staging_rank,
    synthetic_pool,
    whole_share,
)
from kvroom.transport.descriptors import page_runs, run_descriptors
from kvroom.transport.staging import chunk_count, chunk_pages
from tests.planning_oracle import Memory, Room, check_room, execute, logical_state
from tests.test_planning import ITEMS_DST, ITEMS_SRC, hybrid, mha, mla, ranks, scenarios


def test_prefill_to_staging_is_todays_chunk_arithmetic() -> None:
    """Whole local pages into ``[layers, chunk_pages, ...]`` of the reservation, as prefill posts them."""
    model = mha(layers=3, page_size=4, heads=4)
    src = ranks(model, 1)[0]
    source = RankRegions(src, synthetic_pool(src, ITEMS_SRC, base=1 << 40))
    pages, size, first = np.array([5, 6, 7, 1, 2]), 2, 1 << 50
    page_bytes = 4 * 4 * 2 * 2
    for c in range(chunk_count(pages.size, size)):
        n = chunk_pages(pages.size, size, c)
        part = pages[c * size : c * size + n]
        staged = staging_rank(src, first, n)
        assert staging_bytes(src, n) == 6 * n * page_bytes
        slots = np.arange(n, dtype=np.int64)
        plan = plan_writes(source, staged, whole_share(staged.layout), ChunkIndices((part, slots)))
        assert plan is not None and len(plan.parts) == 1
        s, d, k = page_runs(part, slots)
        bases = [first + layer * n * page_bytes for layer in range(6)]
        src_bases = [source.regions[f"{x}.{y}"].addr for x in "kv" for y in range(3)]
        assert plan.parts[0].local.tolist() == run_descriptors(src_bases, page_bytes, s, k).tolist()
        assert plan.parts[0].remote.tolist() == run_descriptors(bases, page_bytes, d, k).tolist()


def staged_room(sources: list[RankLayout], destinations: list[RankLayout], room: Room, size: int) -> None:
    """Run ``room`` with every page through staging chunks of ``size`` pages; check the bytes."""
    model = sources[0].model
    truth = logical_state(sources[0], ITEMS_SRC, seed=3)
    src_mem = []
    for i, s in enumerate(sources):
        mem = Memory(RankRegions(s, synthetic_pool(s, ITEMS_SRC, base=(1 << 40) * (i + 1))))
        mem.fill_from(truth)
        src_mem.append(mem)
    dst_mems = []
    for j, d in enumerate(destinations):
        dest = RankRegions(d, synthetic_pool(d, ITEMS_DST, base=(1 << 50) + (1 << 40) * j, gap=16))
        dst = Memory(dest)
        dst.fill_random(j)
        table = assign(d, sources)
        total = room.dst_pages.size
        for i, s in enumerate(sources):
            mine = for_source(table, i)
            paged = tuple(a for a in mine if model.by_key[a.key].space == "kv")
            rest = tuple(a for a in mine if model.by_key[a.key].space != "kv")
            for c in room.chunks():  # state and aux go in place
                plan = plan_writes(src_mem[i].rank, dest, rest, c)
                if plan is not None:
                    execute(plan, src_mem[i], dst)
            if not paged:
                continue
            whole = align_chunk(room.src_pages, 0, room.dst_pages, room.prefix)
            for c in range(chunk_count(total, size)):  # one reservation per staging chunk
                lo, k = c * size, chunk_pages(total, size, c)
                staged = staging_rank(s, (1 << 60) + c * (1 << 30), k)
                ring = Memory(staged)
                slots = np.arange(k, dtype=np.int64)
                up = plan_writes(
                    src_mem[i].rank,
                    staged,
                    whole_share(staged.layout),
                    ChunkIndices((whole.pages[0][lo : lo + k], slots)),
                )
                down = plan_writes(staged, dest, paged, ChunkIndices((slots, whole.pages[1][lo : lo + k])))
                assert up is not None and down is not None
                execute(up, src_mem[i], ring)
                execute(down, ring, dst)
        dst_mems.append(dst)
    check_room(dst_mems, truth, room)


@pytest.mark.parametrize(
    "model", [mha(heads=4), mha(heads=2), mla(), hybrid()], ids=["mha", "replicated", "mla", "hybrid"]
)
@pytest.mark.parametrize(("m", "n"), [(1, 2), (2, 4), (4, 2), (2, 1)])
def test_staged_rooms_land_like_direct_ones(model: ModelLayout, m: int, n: int) -> None:
    """Prefill writes whole pages to staging chunks; decode's scatter is the real assignment's plan."""
    room = Room(
        src_pages=np.array([4, 0, 7, 3, 8]),
        dst_pages=np.array([6, 1, 2, 5]),
        prefix=1,
        chunk=3,
        state={"mamba": (np.array([1]), np.array([2]))},
        aux=(2, 4),
    )
    staged_room(ranks(model, m), ranks(model, n), room, size=2)


@settings(max_examples=150, deadline=None)
@given(scenarios(), st.integers(1, 4))
def test_any_layout_stages_like_it_writes_directly(
    scenario: tuple[list[RankLayout], list[RankLayout], Room], size: int
) -> None:
    sources, destinations, room = scenario
    staged_room(sources, destinations, room, size)
