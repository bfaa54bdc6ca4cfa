"""The tensor-pool path for kvroom's staging ring (``KVROOM_STAGING_PAGES``, set on both sides).

kvroom's staging ring (whole pages per WRITE into a decode ring, one scatter on
decode, for prefill TP != decode TP) lives on its torch tensor pools only.  For
it, :func:`pool_from_kv_args` aliases an MHA host pool's pointers as uint8
tensors (no copy: NIXL registers SGLang's own buffers), ``K_0..K_{L-1},
V_0..V_{L-1}`` as 2L layers ``[pages, page_size, kv_heads, head_bytes]``, and
:class:`AuxPacker` packs SGLang's metadata rows into the pool's single aux slot
(prefill before the last chunk, decode on Success).  Everything else takes the
raw-region path of :mod:`kvroom.integrations.sglang.regions`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import torch

from kvroom.integrations.sglang.regions import Unsupported, check_supported, mem_kinds, state_lists
from kvroom.transport.layout import KVPool

__all__ = ["AuxPacker", "alias", "pool_from_kv_args"]


def alias(ptr: int, nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor over ``nbytes`` of host memory at ``ptr`` (no copy)."""
    if ptr <= 0 or nbytes <= 0:
        raise ValueError(f"cannot alias {nbytes} bytes at address {ptr:#x}")
    buffer = (ctypes.c_uint8 * nbytes).from_address(ptr)
    return torch.frombuffer(buffer, dtype=torch.uint8)


def _equal(values: Sequence[int], what: str) -> int:
    if not values or len(set(values)) != 1:
        raise ValueError(f"kvroom needs every KV buffer to have one {what}, got {sorted(set(values))}")
    return int(values[0])


def pool_from_kv_args(
    args: Any, *, kv_heads: int, tp_rank: int, tp_size: int, aux: torch.Tensor, staging_pages: int
) -> KVPool:
    """A tensor pool aliasing an MHA host pool, for decode's staging ring (``KVROOM_STAGING_PAGES``).

    kvroom's staging ring lives on tensor pools only, which hold MHA pages and
    one aux tensor (``aux``, an :class:`AuxPacker`'s); anything else is
    :class:`Unsupported` with the ring.
    """
    check_supported(args)
    if any(state_lists(args, "data_ptrs")):
        raise Unsupported("kvroom's staging ring (KVROOM_STAGING_PAGES) does not carry state buffers")
    if mem_kinds(args, 1)[0][0] != "DRAM":
        raise Unsupported("kvroom's staging ring (KVROOM_STAGING_PAGES) aliases host (DRAM) KV buffers only")
    page_size = int(args.page_size)
    item = _equal(list(args.kv_item_lens), "page size in bytes")
    pages = min(int(n) // item for n in args.kv_data_lens)
    if pages <= 0:
        raise ValueError("KV buffers hold no whole page")
    if kv_heads <= 0 or item % (page_size * kv_heads):
        raise ValueError(f"a {item}-byte page does not split into {page_size} tokens x {kv_heads} heads")
    head_bytes = item // (page_size * kv_heads)
    layers = [
        alias(int(ptr), pages * item).view(pages, page_size, kv_heads, head_bytes)
        for ptr in args.kv_data_ptrs
    ]
    return KVPool(
        layers,
        aux,
        page_size=page_size,
        kv_heads=kv_heads,
        tp_rank=tp_rank,
        tp_size=tp_size,
        staging_pages=staging_pages,
    )


class AuxPacker:
    """SGLang's aux (metadata) buffers, one row each per request, packed into one tensor-pool aux slot."""

    def __init__(self, ptrs: Sequence[int], lens: Sequence[int], item_lens: Sequence[int]) -> None:
        if not ptrs or not len(ptrs) == len(lens) == len(item_lens):
            raise ValueError("KVArgs needs aux_data_ptrs/lens/item_lens of one non-zero length")
        self.slots = min(int(n) // int(i) for n, i in zip(lens, item_lens, strict=True))
        if self.slots <= 0:
            raise ValueError("aux buffers hold no whole row")
        self.buffers = [
            alias(int(p), self.slots * int(i)).view(self.slots, int(i))
            for p, i in zip(ptrs, item_lens, strict=True)
        ]
        self.offsets: list[tuple[int, int]] = []
        start = 0
        for i in item_lens:
            self.offsets.append((start, start + int(i)))
            start += int(i)
        self.packed = torch.zeros(self.slots, start, dtype=torch.uint8)

    def pack(self, slot: int) -> None:
        """Copy row ``slot`` of every SGLang buffer into packed slot ``slot`` (prefill)."""
        row = self.packed[slot]
        for buffer, (lo, hi) in zip(self.buffers, self.offsets, strict=True):
            row[lo:hi].copy_(buffer[slot])

    def unpack(self, slot: int) -> None:
        """Copy packed slot ``slot`` into row ``slot`` of every SGLang buffer (decode)."""
        row = self.packed[slot]
        for buffer, (lo, hi) in zip(self.buffers, self.offsets, strict=True):
            buffer[slot].copy_(row[lo:hi])
