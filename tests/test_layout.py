"""Pool validation and layout compatibility."""

from __future__ import annotations

import pytest
import torch

from kvroom.errors import IncompatiblePeerError
from kvroom.transport.layout import KVLayout, KVPool, Regions


def pool(dtype: torch.dtype = torch.float16, layers: int = 2) -> KVPool:
    return KVPool(
        [torch.zeros(8, 4, 16, dtype=dtype) for _ in range(layers)], torch.zeros(4, 8, dtype=torch.uint8)
    )


def test_layout_is_derived_from_the_tensors() -> None:
    p = pool()
    assert p.layout == KVLayout(layers=2, page_bytes=128, dtype="float16", aux_slot_bytes=8, page_size=1)
    assert p.num_pages == 8 and p.mem == "DRAM" and len(p.regions.bases) == 2
    assert Regions.from_dict(p.regions.to_dict()) == p.regions
    assert KVLayout.from_dict(p.layout.to_dict()) == p.layout


def test_incompatible_peers_are_refused_naming_every_difference() -> None:
    with pytest.raises(IncompatiblePeerError, match=r"layers: ours 2, theirs 3.*dtype: ours 'float16'"):
        pool().layout.check_compatible(pool(torch.bfloat16, layers=3).layout, "decode-x")


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
    [{}, {"layers": "x"}, {"layers": 0, "page_bytes": 1, "dtype": "f", "aux_slot_bytes": 1, "page_size": 1}],
)
def test_malformed_peer_layouts_raise_value_error(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="malformed layout"):
        KVLayout.from_dict(bad)
