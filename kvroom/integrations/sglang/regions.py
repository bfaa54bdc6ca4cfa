"""SGLang's ``KVArgs`` as a kvroom :class:`~kvroom.KVPool`, and its aux buffers packed into one slot.

SGLang hands a transfer backend raw pointers.  kvroom's core pool takes torch
tensors, so for host memory (DRAM) the pointers are aliased as uint8 tensors
(no copy; the tensors' ``data_ptr()`` are SGLang's pointers, so NIXL registers
SGLang's own buffers).  An MHA token pool's ``[K_0..K_{L-1}, V_0..V_{L-1}]``
buffers become 2L kvroom "layers" shaped ``[pages, page_size, kv_heads,
head_bytes]`` (uint8), which keeps kvroom's head slicing for prefill TP !=
decode TP.

kvroom's pool has one aux tensor of fixed slot size, SGLang ~13-15 metadata
buffers of different row sizes indexed by one row index.  :class:`AuxPacker`
keeps a packed aux tensor with one slot per row holding every buffer's row
back to back: prefill packs the row before the last chunk is posted, decode
unpacks it once kvroom reports Success (before SGLang's metadata gate reads
it).  That is one host copy of a few KiB per request on each side.

Not supported by kvroom's core yet, each refused with an error naming it:
MLA pools, state buffers (mamba, SWA, DSA, ...), speculative-decoding draft
KV buffers, pipeline-parallel prefill, device (VRAM) memory, host-destination
receive.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import torch

from kvroom.transport.layout import KVPool

__all__ = ["AuxPacker", "Unsupported", "alias", "pool_from_kv_args"]


class Unsupported(NotImplementedError):
    """A KVArgs feature kvroom's core cannot transfer yet (the message names it)."""


def alias(ptr: int, nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor over ``nbytes`` of host memory at ``ptr`` (no copy)."""
    if ptr <= 0 or nbytes <= 0:
        raise ValueError(f"cannot alias {nbytes} bytes at address {ptr:#x}")
    buffer = (ctypes.c_uint8 * nbytes).from_address(ptr)
    return torch.frombuffer(buffer, dtype=torch.uint8)


def _check_supported(args: Any, is_mla: bool, pp_size: int) -> None:
    if is_mla:
        raise Unsupported("kvroom's SGLang backend does not transfer MLA KV pools yet (MHA only)")
    if getattr(args, "num_draft_entries", 0):
        raise Unsupported(
            "kvroom's SGLang backend does not transfer speculative-decoding draft KV buffers yet"
        )
    if any(list(ptrs) for ptrs in getattr(args, "state_data_ptrs", None) or []):
        types = [getattr(t, "value", t) for t in getattr(args, "state_types", [])]
        raise Unsupported(f"kvroom's SGLang backend does not transfer state buffers ({types}) yet")
    if pp_size > 1:
        raise Unsupported("kvroom's SGLang backend does not support pipeline-parallel prefill yet")
    kinds = getattr(args, "kv_data_mem_kinds", None) or []
    if any(kind != "DRAM" for kind in kinds) or (not kinds and torch.cuda.is_available()):
        raise Unsupported(
            "kvroom's SGLang backend aliases host (DRAM) KV buffers only; device (VRAM) pools "
            "need kvroom's raw-region pools"
        )


def _equal(values: Sequence[int], what: str) -> int:
    if not values or len(set(values)) != 1:
        raise ValueError(f"kvroom needs every KV buffer to have one {what}, got {sorted(set(values))}")
    return int(values[0])


def pool_from_kv_args(
    args: Any,
    *,
    kv_heads: int,
    tp_rank: int,
    tp_size: int,
    aux: torch.Tensor,
    is_mla: bool = False,
    pp_size: int = 1,
    staging_pages: int = 0,
) -> KVPool:
    """The kvroom pool over the KV buffers of ``args`` (MHA, DRAM), with ``aux`` as its aux tensor."""
    _check_supported(args, is_mla, pp_size)
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
    """SGLang's aux (metadata) buffers, one row each per request, packed into one kvroom aux slot."""

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
