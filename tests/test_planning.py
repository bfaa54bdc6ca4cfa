"""WRITE planning against a numpy gather/scatter of the same logical bytes.

Hypothesis draws model families (MHA/GQA with replicated heads, MLA, hybrid
attention + mamba state, sliding-window pages), TP m -> n with m, n in
{1, 2, 4}, PP splits, decode prefixes, chunking, state and aux rows; every
source rank's plan into every destination rank is executed as memcpy on fake
memory (tests/planning_oracle.py).  Named tests pin each family's shape of plan
and the refusals.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvroom.errors import IncompatiblePeerError
from kvroom.planning import (
    Buffer,
    ModelLayout,
    RankLayout,
    RankRegions,
    Section,
    align_chunk,
    assign,
    attention_buffers,
    aux_buffers,
    draft_buffers,
    for_source,
    group_ranks,
    plan_writes,
    route,
    synthetic_pool,
    tp_heads,
    writing_sources,
)
from kvroom.transport.descriptors import page_runs, row_descriptors, run_descriptors
from tests.planning_oracle import Room, check_room, run_room

ITEMS_SRC = {"kv": 10, "aux": 4, "mamba": 3, "swa": 10}
ITEMS_DST = {"kv": 9, "aux": 5, "mamba": 4, "swa": 9}
AUX = aux_buffers({"output_ids": 8, "hidden": 6})


def mha(
    layers: int = 2, page_size: int = 2, heads: int = 4, dim: int = 2, dtype: str = "bfloat16"
) -> ModelLayout:
    return ModelLayout(
        layers, page_size, attention_buffers(range(layers), page_size, heads, dim, dtype) + AUX
    )


def mla(layers: int = 2, page_size: int = 2, dim: int = 5) -> ModelLayout:
    return ModelLayout(
        layers, page_size, attention_buffers(range(layers), page_size, 1, dim, "bfloat16", ("kv",)) + AUX
    )


def hybrid(layers: int = 4, page_size: int = 2, heads: int = 2, qk: int = 2, v: int = 4) -> ModelLayout:
    """Every other layer full attention, the rest mamba: conv rows of q, k, v channel sections, ssm heads."""
    full = [x for x in range(layers) if x % 2]
    linear = [x for x in range(layers) if not x % 2]
    conv = tuple(
        Buffer("conv", x, "mamba", 3, (Section(qk, 2), Section(qk, 2), Section(v, 2)), "bfloat16")
        for x in linear
    )
    ssm = tuple(Buffer("ssm", x, "mamba", 1, (Section(v, 3),), "float32") for x in linear)
    return ModelLayout(
        layers, page_size, attention_buffers(full, page_size, heads, 2, "bfloat16") + conv + ssm + AUX
    )


def swa(layers: int = 2, page_size: int = 2, heads: int = 2) -> ModelLayout:
    """Global layers in the page list, sliding-window layers in their own page space."""
    full = attention_buffers([x for x in range(layers) if x % 2], page_size, heads, 2, "float16")
    window = attention_buffers(
        [x for x in range(layers) if not x % 2], page_size, heads, 2, "float16", ("swa_k", "swa_v"), "swa"
    )
    return ModelLayout(layers, page_size, full + window + AUX)


def ranks(model: ModelLayout, tp: int, pp: int = 1) -> list[RankLayout]:
    return [RankLayout(model, t, tp, p, pp) for p in range(pp) for t in range(tp)]


def bound(layout: RankLayout, items: dict[str, int] = ITEMS_DST, base: int = 1 << 32) -> RankRegions:
    return RankRegions(layout, synthetic_pool(layout, items, base=base))


def simple_room(n: int = 5, prefix: int = 0, chunk: int = 2, aux: bool = True, state: bool = False) -> Room:
    rng = np.random.default_rng(n * 7 + prefix)
    return Room(
        src_pages=rng.permutation(10)[:n].astype(np.int64),
        dst_pages=rng.permutation(9)[: n - prefix].astype(np.int64),
        prefix=prefix,
        chunk=chunk,
        state={"mamba": (np.array([2]), np.array([1])), "swa": (np.array([4, 5, 1]), np.array([0, 3, 8]))}
        if state
        else {},
        aux=(1, 3) if aux else None,
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[RankLayout], list[RankLayout], Room]:
    family = draw(st.sampled_from(["mha", "mla", "hybrid", "swa"]))
    page_size = draw(st.integers(1, 3))
    layers = draw(st.integers(1, 4)) if family in ("mha", "mla") else draw(st.sampled_from([2, 4]))
    heads = draw(st.sampled_from([1, 2, 4, 8]))
    if family == "mha":
        model = mha(
            layers, page_size, heads, draw(st.integers(1, 3)), draw(st.sampled_from(["uint8", "bfloat16"]))
        )
    elif family == "mla":
        model = mla(layers, page_size, draw(st.integers(1, 6)))
    elif family == "hybrid":
        model = hybrid(
            layers, page_size, heads, draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([2, 4, 8]))
        )
    else:
        model = swa(layers, page_size, heads)
    tp_src, tp_dst = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 4]))
    pp_src = draw(st.integers(1, min(2, layers)))
    pp_dst = draw(st.integers(1, min(2, layers)))
    sources = ranks(model, tp_src, pp_src)
    order = draw(st.permutations(range(len(sources))))
    n = draw(st.integers(0, 6))
    prefix = draw(st.integers(0, n))
    src_pages = np.array(draw(st.permutations(range(10)))[:n], np.int64)
    if draw(st.booleans()):
        src_pages = np.sort(src_pages)  # runs
    dst_pages = np.array(draw(st.permutations(range(9)))[: n - prefix], np.int64)
    if draw(st.booleans()):
        dst_pages = np.sort(dst_pages)
    k = draw(st.integers(0, 3))
    state = {
        "mamba": (np.array([draw(st.integers(0, 2))]), np.array([draw(st.integers(0, 3))])),
        "swa": (
            np.array(draw(st.permutations(range(10)))[:k], np.int64),
            np.array(draw(st.permutations(range(9)))[:k], np.int64),
        ),
    }
    aux = (draw(st.integers(0, 3)), draw(st.integers(0, 4))) if draw(st.booleans()) else None
    room = Room(src_pages, dst_pages, prefix, draw(st.integers(1, max(1, n))), state, aux)
    return [sources[i] for i in order], ranks(model, tp_dst, pp_dst), room


@pytest.mark.parametrize("joined", [False, True], ids=["chunk_by_chunk", "joined"])
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios())
def test_every_layout_moves_exactly_the_logical_bytes_once(
    scenario: tuple[list[RankLayout], list[RankLayout], Room], joined: bool
) -> None:
    """Chunk by chunk, or a burst joined in one pass (prefill's outbox): the same bytes, each once."""
    sources, destinations, room = scenario
    dst_mem, _, truth = run_room(sources, destinations, ITEMS_SRC, ITEMS_DST, room, joined=joined)
    check_room(dst_mem, truth, room)


# -- named cases, one per family -------------------------------------------------


@pytest.mark.parametrize(
    ("total", "size", "want"),
    [
        (8, 2, [(0, 4), (4, 8)]),
        (2, 4, [(0, 1), (0, 1), (1, 2), (1, 2)]),
        (1, 4, [(0, 1)] * 4),
        (4, 4, [(i, i + 1) for i in range(4)]),
    ],
)
def test_tp_heads_slices_or_replicates(total: int, size: int, want: list[tuple[int, int]]) -> None:
    assert [tp_heads(total, r, size) for r in range(size)] == want


@pytest.mark.parametrize(("total", "size"), [(6, 4), (3, 4)])
def test_heads_that_do_not_split_are_refused(total: int, size: int) -> None:
    with pytest.raises(ValueError, match="heads do not"):
        tp_heads(total, 0, size)


def test_equal_tp_writes_whole_page_runs_like_today() -> None:
    model = mha(layers=3)
    src, dst = bound(ranks(model, 2)[1], ITEMS_SRC, 1 << 40), bound(ranks(model, 2)[1])
    pages, dest = np.array([3, 4, 5, 0, 7]), np.array([1, 2, 3, 8, 6])
    plan = plan_writes(
        src, dst, for_source(assign(dst.layout, ranks(model, 2)), 1), align_chunk(pages, 0, dest, 0)
    )
    assert plan is not None and len(plan.parts) == 1
    s, d, n = page_runs(pages, dest)
    page_bytes = 2 * 2 * 2 * 2  # tokens x local heads x dim x bf16
    assert (
        plan.parts[0].local.tolist()
        == run_descriptors(
            [src.regions[f"{x}.{y}"].addr for x in "kv" for y in range(3)], page_bytes, s, n
        ).tolist()
    )
    assert (
        plan.parts[0].remote.tolist()
        == run_descriptors(
            [dst.regions[f"{x}.{y}"].addr for x in "kv" for y in range(3)], page_bytes, d, n
        ).tolist()
    )


def test_interleaved_head_slices_write_one_row_per_token_like_today() -> None:
    model = mha(layers=1, page_size=4, heads=4, dim=2)
    src = bound(ranks(model, 1)[0], ITEMS_SRC, 1 << 40)
    dst = bound(ranks(model, 2)[1])
    table = assign(dst.layout, [src.layout])
    assert [(a.key, a.heads) for a in table if a.key in ("k.0", "v.0")] == [("k.0", (2, 4)), ("v.0", (2, 4))]
    pages, dest = np.array([2, 5]), np.array([0, 1])
    plan = plan_writes(src, dst, table, align_chunk(pages, 0, dest, 0))
    assert plan is not None
    hb = 2 * 2
    local = row_descriptors(
        [src.regions["k.0"].addr, src.regions["v.0"].addr], 4 * 4 * hb, pages, 4, 4 * hb, 2 * hb, 2 * hb
    )
    remote = row_descriptors(
        [dst.regions["k.0"].addr, dst.regions["v.0"].addr], 4 * 2 * hb, dest, 4, 2 * hb, 0, 2 * hb
    )
    assert plan.parts[0].local.tolist() == local.tolist() and plan.parts[0].remote.tolist() == remote.tolist()


@pytest.mark.parametrize(("m", "n", "writers"), [(4, 2, [[0], [3]]), (2, 4, [[0], [0], [1], [1]])])
def test_replicated_heads_come_from_exactly_one_replica(m: int, n: int, writers: list[list[int]]) -> None:
    model = mha(heads=2)
    sources = ranks(model, m)
    got = [
        sorted(writing_sources(a for a in assign(d, sources) if a.key != "output_ids" and a.key != "hidden"))
        for d in ranks(model, n)
    ]
    assert got == writers
    dst_mem, _, truth = run_room(sources, ranks(model, n), ITEMS_SRC, ITEMS_DST, simple_room())
    check_room(dst_mem, truth, simple_room())


@pytest.mark.parametrize(("m", "n", "writers"), [(1, 2, [0, 0]), (2, 1, [0]), (4, 2, [0, 1])])
def test_mla_has_one_writer_per_decode_rank_and_whole_pages(m: int, n: int, writers: list[int]) -> None:
    model = mla()
    sources = ranks(model, m)
    room = simple_room(n=6, prefix=2)
    for d, writer in zip(ranks(model, n), writers, strict=True):
        table = assign(d, sources)
        assert writing_sources(table) == {writer}
        dst = bound(d)
        for i, s in enumerate(sources):
            plans = [
                plan_writes(bound(s, ITEMS_SRC, 1 << 40), dst, for_source(table, i), c) for c in room.chunks()
            ]
            if i != writer:
                assert plans == [None] * len(plans)  # a watching rank: only the verdict
            else:  # latent pages are whole: one row per (layer, run), never per token
                for plan, c in zip(plans, room.chunks(), strict=True):
                    runs = page_runs(*c.pages)[2].size * 2 + (2 if c.aux else 0)
                    assert (plan.rows if plan else 0) == runs
    dst_mem, _, truth = run_room(sources, ranks(model, n), ITEMS_SRC, ITEMS_DST, room)
    check_room(dst_mem, truth, room)


def test_pipeline_stages_write_their_layers_at_their_offset() -> None:
    model = mha(layers=4)
    stages = ranks(model, 1, pp=2)
    assert [s.layers for s in stages] == [(0, 2), (2, 4)]
    table = assign(ranks(model, 1)[0], stages)
    assert {a.key for a in for_source(table, 0)} == {"k.0", "k.1", "v.0", "v.1"}
    assert {a.key for a in for_source(table, 1)} == {"k.2", "k.3", "v.2", "v.3", "output_ids", "hidden"}
    for d in ranks(model, 1, pp=2):  # equal PP: stage to stage
        assert writing_sources(assign(d, stages)) == {d.pp_rank}
    room = simple_room(chunk=3)
    dst_mem, _, truth = run_room(stages, ranks(model, 1), ITEMS_SRC, ITEMS_DST, room)
    check_room(dst_mem, truth, room)


def test_missing_heads_are_refused() -> None:
    model = mha(heads=4)
    with pytest.raises(IncompatiblePeerError, match=r"no source rank holds head 2 of 'k.0'"):
        assign(ranks(model, 1)[0], ranks(model, 2)[:1])


def test_a_missing_stage_is_refused() -> None:
    model = mha(layers=4)
    with pytest.raises(IncompatiblePeerError, match=r"no source rank holds 'k.2'"):
        assign(ranks(model, 1)[0], ranks(model, 1, pp=2)[:1])


def test_hybrid_state_rows_are_sliced_by_section_and_sent_with_the_last_chunk() -> None:
    model = hybrid()
    room = simple_room(state=True)
    first, *_, last = room.chunks()
    assert (
        not first.state and first.aux is None and set(last.state) == {"mamba", "swa"} and last.aux == (1, 3)
    )
    for m, n in [(1, 2), (2, 1), (4, 2), (2, 4)]:
        dst_mem, _, truth = run_room(ranks(model, m), ranks(model, n), ITEMS_SRC, ITEMS_DST, room)
        check_room(dst_mem, truth, room)


def test_sliding_window_pages_move_in_their_own_index_space() -> None:
    model = swa()
    room = simple_room(state=True, prefix=1)
    src, dst = bound(ranks(model, 1)[0], ITEMS_SRC, 1 << 40), bound(ranks(model, 1)[0])
    plan = plan_writes(src, dst, assign(dst.layout, [src.layout]), room.chunks()[-1])
    assert plan is not None
    swa_rows = {int(r[0]) for r in plan.parts[0].remote} & {dst.regions["swa_k.0"].addr + 3 * 16}
    assert swa_rows  # decode swa page 3 of swa_k.0 (pages of 2 tokens x 2 heads x 2 x fp16) is written
    dst_mem, _, truth = run_room(ranks(model, 2), ranks(model, 1), ITEMS_SRC, ITEMS_DST, room)
    check_room(dst_mem, truth, room)


def test_memory_kinds_split_a_plan_into_parts() -> None:
    model = mha(layers=1)
    lay = ranks(model, 1)[0]
    pool = synthetic_pool(lay, ITEMS_DST, base=1 << 32, mem="VRAM", device=3)
    aux = tuple(r.__class__(r.name, r.addr + (1 << 30), r.length, r.item_bytes, "DRAM", 0) for r in pool.aux)
    dst = RankRegions(lay, pool.__class__(pool.kv, aux, pool.state))
    src = bound(lay, ITEMS_SRC, 1 << 40)
    plan = plan_writes(src, dst, assign(lay, [lay]), align_chunk([1, 2], 0, [3, 4], 0, last=True, aux=(0, 1)))
    assert plan is not None
    assert [(p.local_mem, p.remote_mem) for p in plan.parts] == [("DRAM", "VRAM"), ("DRAM", "DRAM")]
    assert set(plan.parts[0].remote[:, 2].tolist()) == {3}  # the destination's device id
    assert plan.parts[1].rows == 2 and plan.rows == 4  # two aux rows; k and v, one run each


def test_align_chunk_skips_the_decode_prefix() -> None:
    c = align_chunk([10, 11, 12, 13], 4, np.arange(100, 106), prefix_pages=6)
    assert c.pages[0].tolist() == [12, 13] and c.pages[1].tolist() == [100, 101] and c.first == 0
    c = align_chunk([10, 11], 0, np.arange(100, 106), prefix_pages=6)
    assert c.pages[0].size == 0 and c.pages[1].size == 0 and c.first == 0
    with pytest.raises(ValueError, match="runs past decode"):
        align_chunk([1, 2, 3], 0, [5], prefix_pages=0)


def test_an_index_outside_a_region_is_refused_naming_it() -> None:
    lay = ranks(mha(layers=1), 1)[0]
    src, dst = bound(lay, ITEMS_SRC, 1 << 40), bound(lay)
    with pytest.raises(ValueError, match=r"destination index 9 outside region 'k.0' of 9 items"):
        plan_writes(src, dst, assign(lay, [lay]), align_chunk([0], 0, [9], 0))


def test_nothing_to_move_is_none() -> None:
    lay = ranks(mha(layers=1), 1)[0]
    src, dst = bound(lay, ITEMS_SRC, 1 << 40), bound(lay)
    assert plan_writes(src, dst, assign(lay, [lay]), align_chunk([], 0, [], 0)) is None


@pytest.mark.parametrize(
    ("theirs", "field"),
    [
        (mha(dim=4), "head_dim"),
        (mha(dtype="float16"), "dtype"),
        (mha(layers=3), "layer count"),
        (mha(heads=8), "total heads"),
        (hybrid(v=8), "state shapes"),
        (
            ModelLayout(
                2, 2, attention_buffers(range(2), 2, 4, 2, "bfloat16") + aux_buffers({"output_ids": 4})
            ),
            "buffers",
        ),
    ],
)
def test_incompatible_models_are_refused_naming_the_field(theirs: ModelLayout, field: str) -> None:
    ours = hybrid() if field == "state shapes" else mha()
    if field == "buffers":  # the same aux names with another row size: "aux rows"
        theirs_aux = ModelLayout(2, 2, ours.buffers[:-2] + aux_buffers({"output_ids": 4, "hidden": 6}))
        with pytest.raises(IncompatiblePeerError, match=r"aux rows \(output_ids: ours \(1, \(\(1, 8\),\)\)"):
            ours.check_compatible(theirs_aux, "decode-1")
    with pytest.raises(IncompatiblePeerError, match=field):
        ours.check_compatible(theirs, "decode-1")
    with pytest.raises(IncompatiblePeerError, match=field):
        assign(ranks(ours, 1)[0], ranks(theirs, 1))


def test_layouts_round_trip_through_dicts() -> None:
    for model in (mha(), mla(), hybrid(), swa()):
        for lay in ranks(model, 2, pp=2):
            assert RankLayout.from_dict(lay.to_dict()) == lay
            rank = bound(lay)
            assert RankRegions.from_dict(rank.to_dict()) == rank


def test_a_route_is_bound_once_and_plans_every_chunk_like_plan_writes() -> None:
    model = hybrid()
    sources, dest = ranks(model, 2), ranks(model, 1)[0]
    dst = bound(dest)
    table = assign(dest, sources)
    room = simple_room(state=True)
    for i, s in enumerate(sources):
        src = bound(s, ITEMS_SRC, 1 << 40)
        r = route(src, dst, for_source(table, i))
        assert not r.empty and r.spaces == ({"kv", "mamba", "aux"} if i == 0 else {"kv", "mamba"})
        for c in room.chunks():
            got, want = r.writes(c), plan_writes(src, dst, for_source(table, i), c)
            assert (got is None) == (want is None)
            if got is not None and want is not None:
                assert [(p.local.tolist(), p.remote.tolist()) for p in got.parts] == [
                    (p.local.tolist(), p.remote.tolist()) for p in want.parts
                ]
    watcher = route(bound(ranks(mla(), 2)[1], ITEMS_SRC), bound(ranks(mla(), 1)[0]), ())
    assert watcher.empty and watcher.writes(room.chunks()[-1]) is None


@pytest.mark.parametrize(
    ("model", "m", "n", "interleaved"),
    [(mha(), 2, 2, False), (mha(), 1, 2, True), (mha(page_size=1), 1, 2, True), (mla(), 1, 2, False)],
)
def test_a_route_says_when_head_slices_interleave(
    model: ModelLayout, m: int, n: int, interleaved: bool
) -> None:
    dest = ranks(model, n)[0]
    source = bound(ranks(model, m)[0], ITEMS_SRC, 1 << 40)
    r = route(source, bound(dest), for_source(assign(dest, ranks(model, m)), 0))
    assert r.interleaved is interleaved


def test_the_assignment_does_not_depend_on_the_order_sources_are_listed() -> None:
    model = mla(layers=4)
    sources = ranks(model, 4, pp=2)
    shuffled = [sources[i] for i in (5, 2, 7, 0, 3, 6, 1, 4)]
    for dest in ranks(model, 2):
        plain = {(sources[a.source].pp_rank, sources[a.source].tp_rank, a.key) for a in assign(dest, sources)}
        mixed = {
            (shuffled[a.source].pp_rank, shuffled[a.source].tp_rank, a.key) for a in assign(dest, shuffled)
        }
        assert plain == mixed


@pytest.mark.parametrize(("m", "n", "pp"), [(2, 1, 1), (1, 2, 2), (4, 4, 1)])
def test_draft_model_buffers_ride_the_page_list_with_their_own_item_size(m: int, n: int, pp: int) -> None:
    target = attention_buffers(range(2), 2, 4, 2, "bfloat16")
    model = ModelLayout(2, 2, target + draft_buffers(1, 2, 2, 3, "float16") + AUX)
    assert {b.key for b in model.buffers} >= {"draft_k.0", "draft_v.0"}
    stages = ranks(model, m, pp)
    assert [s.holds(model.by_key["draft_k.0"]) for s in stages] == [s.pp_rank == pp - 1 for s in stages]
    lay = stages[-1]
    assert lay.item_bytes(model.by_key["draft_k.0"]) != lay.item_bytes(model.by_key["k.0"])
    room = simple_room(chunk=2)
    dst_mem, _, truth = run_room(stages, ranks(model, n), ITEMS_SRC, ITEMS_DST, room)
    check_room(dst_mem, truth, room)


def test_group_ranks_lists_a_side_stage_major() -> None:
    model = mha(layers=4)
    group = group_ranks(model, 2, 2)
    assert [(r.pp_rank, r.tp_rank, r.layers) for r in group] == [
        (0, 0, (0, 2)), (0, 1, (0, 2)), (1, 0, (2, 4)), (1, 1, (2, 4)),
    ]  # fmt: skip
    assert group == ranks(model, 2, 2)
    uneven = group_ranks(model, 1, 2, [(0, 1), (1, 4)])
    assert [r.layers for r in uneven] == [(0, 1), (1, 4)]
    assert writing_sources(assign(ranks(model, 1)[0], uneven)) == {0, 1}
    with pytest.raises(ValueError, match="2 layer ranges for 3 pipeline stages"):
        group_ranks(model, 1, 3, [(0, 1), (1, 4)])
