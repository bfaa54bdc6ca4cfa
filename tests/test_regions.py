"""Registered regions: validation naming the region, torch tensors, the handshake dicts."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest
import torch

from kvroom.errors import IncompatiblePeerError
from kvroom.planning import (
    ModelLayout,
    RankLayout,
    RankRegions,
    align_chunk,
    assign,
    attention_buffers,
    aux_buffers,
    from_kv_pool,
    plan_writes,
    synthetic_pool,
)
from kvroom.transport.layout import KVPool
from kvroom.transport.regions import Region, RegionPool


def region(name: str = "k.0", addr: int = 0x1000, length: int = 256, item: int = 64, **kw: Any) -> Region:
    return Region(name, addr, length, item, **kw)


def test_a_region_counts_its_items() -> None:
    r = region()
    assert (r.items, r.end, r.mem, r.device) == (4, 0x1100, "DRAM", 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"length": 0}, "region 'k.0': zero length"),
        ({"length": 100}, "region 'k.0': length 100 is not a multiple of its item size 64"),
        ({"item": 0}, "region 'k.0': item size must be positive"),
        ({"mem": "HBM"}, "region 'k.0': memory kind must be one of"),
        ({"addr": -1}, "region 'k.0': negative address"),
        ({"name": ""}, "non-empty name"),
        ({"length": 2.5}, "region 'k.0': length must be an int"),
    ],
)
def test_bad_regions_are_refused_naming_the_region(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        region(**kwargs)


def test_overlapping_regions_are_refused_naming_both() -> None:
    with pytest.raises(ValueError, match=r"region 'v.0' \[0x10c0, 0x11c0\) overlaps region 'k.0'"):
        RegionPool(kv=(region(), region("v.0", addr=0x10C0)))


def test_the_same_addresses_on_other_memory_do_not_overlap() -> None:
    pool = RegionPool(kv=(region(), region("v.0", mem="VRAM"), region("w.0", mem="VRAM", device=1)))
    assert len(pool) == 3


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match=r"region 'k\.0' is named twice"):
        RegionPool(kv=(region(),), aux=(region(addr=0x9000),))


def test_pools_round_trip_through_dicts_and_refuse_malformed_ones() -> None:
    pool = RegionPool(kv=(region(), region("v.0", addr=0x2000)), aux=(region("ids", 0x3000, 40, 8),))
    assert RegionPool.from_dict(pool.to_dict()) == pool
    assert pool.role_of("ids") == "aux" and set(pool.by_name()) == {"k.0", "v.0", "ids"}
    with pytest.raises(ValueError, match="malformed region"):
        RegionPool.from_dict({"kv": [{"name": "k.0"}]})
    with pytest.raises(ValueError, match="expected roles"):
        RegionPool.from_dict({"gpu": []})
    with pytest.raises(ValueError, match="zero length"):
        RegionPool.from_dict({"kv": [{**region().to_dict(), "length": 0}]})


def test_cpu_tensors_are_dram_regions_of_their_first_dimension() -> None:
    k = torch.zeros(6, 4, 2, 8, dtype=torch.bfloat16)
    ids = torch.zeros(3, 2, dtype=torch.int64)
    pool = RegionPool.from_tensors({"k.0": k}, aux={"ids": ids})
    (kr,), (ir,) = pool.kv, pool.aux
    assert (kr.addr, kr.length, kr.item_bytes, kr.items, kr.mem) == (k.data_ptr(), 6 * 128, 128, 6, "DRAM")
    assert (ir.item_bytes, ir.items) == (16, 3)
    with pytest.raises(ValueError, match=r"region 'k\.1': tensor is not contiguous"):
        RegionPool.from_tensors({"k.1": k.transpose(1, 2)})
    with pytest.raises(ValueError, match="region 'e'"):
        RegionPool.from_tensors({"e": torch.zeros(0, 4)})


def layout(tp: int = 1, rank: int = 0) -> RankLayout:
    model = ModelLayout(2, 4, attention_buffers(range(2), 4, 4, 8, "bfloat16") + aux_buffers({"ids": 16}))
    return RankLayout(model, rank, tp)


def test_binding_checks_the_pool_against_the_layout() -> None:
    lay = layout(tp=2, rank=1)
    pool = synthetic_pool(lay, {"kv": 5, "aux": 3})
    bound = RankRegions(lay, pool)
    assert bound.regions["k.1"].item_bytes == 4 * 2 * 8 * 2
    with pytest.raises(ValueError, match=r"region 'v\.1': the layout needs it, the pool lacks it"):
        RankRegions(lay, RegionPool(tuple(r for r in pool.kv if r.name != "v.1"), pool.aux))
    with pytest.raises(
        ValueError, match=r"region 'k.0': item size 256, the layout says 128 \(tp rank 1 of 2\)"
    ):
        RankRegions(lay, synthetic_pool(layout(), {"kv": 5, "aux": 3}))
    with pytest.raises(ValueError, match="region 'ids': registered as kv, the layout says aux"):
        RankRegions(lay, RegionPool(pool.kv + pool.aux))


def test_torch_pools_bind_like_raw_ones() -> None:
    lay = layout(tp=2, rank=0)
    tensors = {f"{n}.{x}": torch.zeros(5, 4, 2, 8, dtype=torch.bfloat16) for n in "kv" for x in range(2)}
    bound = RankRegions(
        lay, RegionPool.from_tensors(tensors, aux={"ids": torch.zeros(3, 16, dtype=torch.uint8)})
    )
    assert RankRegions.from_dict(bound.to_dict()) == bound


def test_todays_tensor_pools_describe_themselves_as_regions() -> None:
    def kv_pool(rank: int, tp: int) -> KVPool:
        layers = [torch.zeros(6, 2, 4 // tp, 8, dtype=torch.float16) for _ in range(3)]
        return KVPool(
            layers,
            torch.zeros(4, 16, dtype=torch.uint8),
            page_size=2,
            kv_heads=4 // tp,
            tp_rank=rank,
            tp_size=tp,
        )

    src, dst = kv_pool(0, 1), kv_pool(1, 2)
    source, dest = from_kv_pool(src), from_kv_pool(dst)
    assert source.regions["layer.2"].addr == src.layers[2].data_ptr() and dest.regions["aux"].item_bytes == 16
    source.check_compatible(dest, "decode-1")
    plan = plan_writes(
        source, dest, assign(dest.layout, [source.layout]), align_chunk([4], 0, [1], 0, last=True, aux=(0, 3))
    )
    assert plan is not None
    for layer in range(3):
        src.layers[layer].copy_(torch.randn(6, 2, 4, 8, dtype=torch.float16))
    for part in plan.parts:
        for (a, n, _), (b, _, _) in zip(part.local.tolist(), part.remote.tolist(), strict=True):
            ctypes.memmove(b, a, n)
    for layer in range(3):
        assert torch.equal(dst.layers[layer][1], src.layers[layer][4][:, 2:4])


def test_the_handshake_refuses_another_model_naming_the_field() -> None:
    ours = RankRegions(layout(), synthetic_pool(layout(), {"kv": 5, "aux": 3}))
    model = ModelLayout(2, 4, attention_buffers(range(2), 4, 4, 16, "bfloat16") + aux_buffers({"ids": 16}))
    theirs = RankRegions(RankLayout(model), synthetic_pool(RankLayout(model), {"kv": 5, "aux": 3}))
    with pytest.raises(
        IncompatiblePeerError, match=r"peer decode-0 has an incompatible layout: head_dim \(k\.0: ours 8"
    ):
        ours.check_compatible(RankRegions.from_dict(theirs.to_dict()), "decode-0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_vram_regions_on_their_device() -> None:
    t = torch.zeros(4, 64, dtype=torch.bfloat16, device="cuda")
    (r,) = RegionPool.from_tensors({"k.0": t}).kv
    assert (r.mem, r.device, r.addr, r.item_bytes) == ("VRAM", t.device.index or 0, t.data_ptr(), 128)
