"""Pool validation and layout compatibility."""

from __future__ import annotations

import pytest
import torch

from kvroom.errors import IncompatiblePeerError
from kvroom.transport.layout import KVLayout, KVPool, Regions, head_overlap


def pool(dtype: torch.dtype = torch.float16, layers: int = 2) -> KVPool:
    return KVPool(
        [torch.zeros(8, 4, 16, dtype=dtype) for _ in range(layers)], torch.zeros(4, 8, dtype=torch.uint8)
    )


def test_layout_is_derived_from_the_tensors() -> None:
    p = pool()
    assert p.layout == KVLayout(
        layers=2, page_size=1, kv_heads=1, head_dim=64, dtype="float16", elem_bytes=2, aux_slot_bytes=8
    )
    assert p.page_bytes == p.layout.page_bytes == 128
    assert p.num_pages == 8 and p.mem == "DRAM" and len(p.regions.bases) == 2
    assert Regions.from_dict(p.regions.to_dict()) == p.regions
    assert KVLayout.from_dict(p.layout.to_dict()) == p.layout


def test_incompatible_peers_are_refused_naming_every_difference() -> None:
    with pytest.raises(IncompatiblePeerError, match=r"layers: ours 2, theirs 3.*dtype: ours 'float16'"):
        pool().layout.check_compatible(pool(torch.bfloat16, layers=3).layout, "decode-x")


def tp_pool(tp_rank: int, tp_size: int, heads: int = 4, page_size: int = 2, dim: int = 8) -> KVPool:
    kv = heads // tp_size
    return KVPool(
        [torch.zeros(6, page_size, kv, dim, dtype=torch.bfloat16) for _ in range(3)],
        torch.zeros(2, 8, dtype=torch.uint8),
        page_size=page_size,
        kv_heads=kv,
        tp_rank=tp_rank,
        tp_size=tp_size,
    )


def test_tensor_parallel_ranks_describe_their_head_slice() -> None:
    rank = tp_pool(1, 2)
    lay = rank.layout
    assert (lay.kv_heads, lay.total_heads, lay.heads, lay.head_dim) == (2, 4, (2, 4), 8)
    assert lay.page_bytes == rank.page_bytes == 2 * 2 * 8 * 2
    assert KVLayout.from_dict(lay.to_dict()) == lay


@pytest.mark.parametrize(("m", "n"), [(1, 1), (1, 2), (2, 1), (1, 4), (4, 1), (2, 4), (4, 2), (2, 2), (4, 4)])
def test_ranks_of_different_tp_sizes_are_compatible_and_overlap_as_expected(m: int, n: int) -> None:
    prefill = [tp_pool(r, m).layout for r in range(m)]
    decode = [tp_pool(r, n).layout for r in range(n)]
    for d in decode:
        sources = [p for p in prefill if head_overlap(p, d)]
        assert len(sources) == max(1, m // n)
        for p in prefill:
            p.check_compatible(d, "x")
            d.check_compatible(p, "x")
        covered = sorted(h for p in sources for h in range(*head_overlap(p, d) or (0, 0)))
        assert covered == list(range(*d.heads))


@pytest.mark.parametrize(
    ("other", "match"),
    [
        ({"dim": 16}, "head_dim: ours 8, theirs 16"),
        ({"heads": 8}, "total_heads: ours 4, theirs 8"),
        ({"page_size": 4}, "page_size: ours 2, theirs 4"),
    ],
)
def test_peers_differing_in_what_must_agree_are_refused(other: dict[str, int], match: str) -> None:
    with pytest.raises(IncompatiblePeerError, match=match):
        tp_pool(0, 2).layout.check_compatible(tp_pool(0, 1, **other).layout, "decode-x")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tp_size": 2}, "needs kv_heads"),
        ({"kv_heads": 3}, "kv_heads=3"),
        ({"tp_rank": 1}, "tp_rank"),
        ({"staging_pages": -1}, "staging_pages"),
        ({"page_size": 3}, "does not split"),
    ],
)
def test_bad_tensor_parallel_pool_arguments(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        KVPool([torch.zeros(4, 2, 2, 8)], torch.zeros(2, 2), **kwargs)


@pytest.mark.parametrize(
    ("layers", "aux", "error", "match"),
    [
        ([], torch.zeros(2, 2), ValueError, "at least one layer"),
        ([torch.zeros(4, 2), torch.zeros(5, 2)], torch.zeros(2, 2), ValueError, "layer 1"),
        ([torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.int8)], torch.zeros(2, 2), ValueError, "layer 1"),
        ([torch.zeros(4, 4)[:, ::2]], torch.zeros(2, 2), ValueError, "not contiguous"),
        ([torch.zeros(0, 2)], torch.zeros(2, 2), ValueError, "num_pages"),
        (["not a tensor"], torch.zeros(2, 2), TypeError, "not a torch.Tensor"),
        ([torch.zeros(4, 2)], torch.zeros(0, 2), ValueError, "aux"),
    ],
)
def test_bad_pools_are_rejected(
    layers: list[object], aux: torch.Tensor, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        KVPool(layers, aux)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"layers": "x"},
        {**tp_pool(0, 1).layout.to_dict(), "layers": 0},
        {**tp_pool(0, 1).layout.to_dict(), "tp_rank": 1},
        {**tp_pool(0, 1).layout.to_dict(), "head_dim": True},
    ],
)
def test_malformed_peer_layouts_raise_value_error(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="malformed layout"):
        KVLayout.from_dict(bad)
