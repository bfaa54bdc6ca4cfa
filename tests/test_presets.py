"""Model presets: pools over torch tensors that bind to their layouts, and plans that move them.

The plans are executed with ``ctypes.memmove`` on the real tensors (what a
NIXL WRITE does between processes), and the destination is compared with the
source tensors reassembled per head section.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from kvroom.planning import RankLayout, RankRegions, WritePlan, align_chunk, assign, for_source, plan_writes
from kvroom.presets import PRESETS, get_preset, preset_names


def test_presets_are_named_and_unknown_names_list_the_choices() -> None:
    assert preset_names() == ["llama3-8b", "deepseek-v3", "qwen3-next", "gpt-oss-20b"]
    with pytest.raises(ValueError, match="choose one of llama3-8b, deepseek-v3"):
        get_preset("gpt-2")
    assert get_preset("llama3-8b", layers=2).model.layers == 2


def test_preset_geometry_is_the_real_models() -> None:
    llama, ds, qwen = PRESETS["llama3-8b"].model, PRESETS["deepseek-v3"].model, PRESETS["qwen3-next"].model
    assert llama.by_key["k.0"].shape == (16, ((8, 128),)) and llama.by_key["k.0"].dtype == "bfloat16"
    assert ds.by_key["kv.0"].shape == (64, ((1, 576),)) and "v.0" not in ds.by_key
    assert {b.space for b in qwen.buffers} == {"kv", "mamba", "aux"}
    assert [b.key for b in qwen.buffers if b.space == "kv"] == ["k.3", "k.7", "v.3", "v.7"]
    assert qwen.by_key["ssm.0"].shape == (1, ((32, 128 * 128),)) and qwen.by_key["ssm.0"].dtype == "float32"


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (4, 2)])
def test_preset_pools_bind_to_their_layouts(name: str, tp: int, pp: int) -> None:
    preset = get_preset(name, layers=4)
    for p in range(pp):
        for t in range(tp):
            rank = preset.rank(t, tp, p, pp)
            pool, _tensors = preset.pool(rank, num_pages=2, num_requests=1)
            bound = RankRegions(rank, pool)
            assert set(bound.regions) == {b.key for b in rank.buffers()}


def execute(plan: WritePlan) -> None:
    """Copy each descriptor row in place: what a WRITE does."""
    for part in plan.parts:
        for (src, n, _), (dst, m, _) in zip(part.local.tolist(), part.remote.tolist(), strict=True):
            assert n == m
            ctypes.memmove(dst, src, n)


def sections(rank: RankLayout, key: str, tensor: torch.Tensor) -> list[torch.Tensor]:
    """A rank's tensor as per-section ``[items, rows, local_heads, head_bytes]`` uint8 views."""
    b = rank.model.by_key[key]
    raw = tensor.view(torch.uint8).reshape(tensor.shape[0], b.rows, -1)
    out, off = [], 0
    for i, s in enumerate(b.sections):
        size = rank.section_bytes(b, i)
        out.append(
            raw[:, :, off : off + size].reshape(tensor.shape[0], b.rows, -1, s.head_dim * b.elem_bytes)
        )
        off += size
    return out


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize(("m", "n", "pp"), [(2, 1, 1), (1, 2, 1), (2, 2, 2), (4, 2, 1)])
def test_preset_rooms_land_byte_identical(name: str, m: int, n: int, pp: int) -> None:
    preset = get_preset(name, layers=4)
    sources = [preset.rank(t, m, p, pp) for p in range(pp) for t in range(m)]
    src_pools = [preset.pool(s, num_pages=4, num_requests=2) for s in sources]
    gen = torch.Generator().manual_seed(0)
    # each source rank holds its slice of one random logical state (so replicas are equal)
    logical: dict[str, list[torch.Tensor]] = {}
    for rank, (_, tensors) in zip(sources, src_pools, strict=True):
        for b in rank.buffers():
            parts = sections(rank, b.key, tensors[b.role][b.key])
            logical.setdefault(b.key, [torch.zeros(0)] * len(b.sections))
            for i, s in enumerate(b.sections):
                if logical[b.key][i].numel() == 0:
                    shape = (parts[i].shape[0], b.rows, s.heads, parts[i].shape[3])
                    logical[b.key][i] = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
                lo, hi = rank.heads(s)
                parts[i].copy_(logical[b.key][i][:, :, lo:hi])
    src_pages, dst_pages = np.array([3, 1, 2]), np.array([0, 2, 1])
    state = {"mamba": (np.array([1]), np.array([0])), "swa": (np.array([0, 3]), np.array([3, 1]))}
    chunks = [
        align_chunk(src_pages[:2], 0, dst_pages, 0),
        align_chunk(src_pages[2:], 2, dst_pages, 0, last=True, state=state, aux=(1, 0)),
    ]
    for d in range(n):
        dest = preset.rank(d, n)
        pool, tensors = preset.pool(dest, num_pages=4, num_requests=2)
        table = assign(dest, sources)
        for i, (src_pool, _) in enumerate(src_pools):
            for c in chunks:
                plan = plan_writes(
                    RankRegions(sources[i], src_pool), RankRegions(dest, pool), for_source(table, i), c
                )
                if plan is not None:
                    execute(plan)
        pairs = {"kv": (src_pages, dst_pages), "aux": (np.array([1]), np.array([0])), **state}
        for b in dest.buffers():
            s_idx, d_idx = pairs[b.space]
            got = sections(dest, b.key, tensors[b.role][b.key])
            for i, s in enumerate(b.sections):
                lo, hi = dest.heads(s)
                want = logical[b.key][i][torch.from_numpy(s_idx)][:, :, lo:hi]
                assert torch.equal(got[i][torch.from_numpy(d_idx)], want), f"{name} {b.key} section {i}"
