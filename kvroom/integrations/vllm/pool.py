"""vLLM's per-layer KV cache tensors as a kvroom :class:`~kvroom.KVPool`.

vLLM 0.33 hands ``register_kv_caches`` one view per attention layer with the
logical shape ``[blocks, heads, tokens, content]`` (K and V packed in the
content dimension) and strides set by the resolved ``KVCacheLayout``.  With a
token-major layout (``LBNHC``, the default on GPUs) a layer permuted to
``[blocks, tokens, heads, content]`` is contiguous: exactly kvroom's
``[pages, page_size, kv_heads, head_dim]``, so pages are vLLM blocks and head
slices work across tensor-parallel sizes.  Any other layout whose layer view
is contiguous (``LBHNC``, the CPU backend's) is registered with opaque pages:
whole blocks move, so both sides must run the same tensor-parallel size.
Older 5-D caches ``[2, blocks, tokens, heads, head_dim]`` become two "layers",
K and V.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from kvroom import KVPool

__all__ = ["pool_from_caches", "token_major"]


def token_major(cache: torch.Tensor, block_size: int) -> torch.Tensor | None:
    """``cache`` as a contiguous ``[blocks, block_size, heads, dim]`` view, or None."""
    if cache.dim() == 4:
        view = cache.permute(0, 2, 1, 3)
        if view.is_contiguous() and view.shape[1] == block_size:
            return view
    return None


def _natural(name: str) -> tuple[tuple[int, str], ...]:
    """Sort key putting ``layers.2`` before ``layers.10`` (both sides order layers alike)."""
    return tuple((int(part), "") if part.isdigit() else (-1, part) for part in re.split(r"(\d+)", name))


def _split(kv_caches: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    layers: list[torch.Tensor] = []
    for name in sorted(kv_caches, key=_natural):
        cache = kv_caches[name]
        if cache.dim() == 5 and cache.shape[0] == 2:  # [2, blocks, tokens, heads, dim]: K and V apart
            layers.extend(half.permute(0, 2, 1, 3) for half in cache.unbind(0))
        else:
            layers.append(cache)
    return layers


def pool_from_caches(
    kv_caches: Mapping[str, torch.Tensor],
    block_size: int,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    staging_pages: int = 0,
) -> KVPool:
    """Build the pool kvroom registers with NIXL from vLLM's layer caches.

    Layers are ordered by name, numbers numerically, so both sides agree.

    ``staging_pages``: decode's staging ring, in pages, for prefill ranks whose head slices
    interleave within decode's pages (unequal tensor parallelism; see kvroom's README).
    Raises ValueError for a layout kvroom cannot address page by page (a
    layer view that is neither token-major nor contiguous, e.g. several
    layers interleaved within a block), naming the layout to choose instead.
    """
    if not kv_caches:
        raise ValueError("no KV cache tensors to register")
    layers = _split(kv_caches)
    aux = torch.zeros(1, 8, dtype=torch.uint8, device=layers[0].device)  # unused: vLLM needs no aux
    views = [token_major(t, block_size) for t in layers]
    if all(v is not None for v in views):
        pages = [v for v in views if v is not None]
        return KVPool(
            pages,
            aux,
            page_size=block_size,
            kv_heads=int(pages[0].shape[2]),
            tp_rank=tp_rank,
            tp_size=tp_size,
            staging_pages=staging_pages,
        )
    if all(t.is_contiguous() and t.dim() >= 2 for t in layers):
        opaque = [t.reshape(t.shape[0], -1) for t in layers]
        return KVPool(opaque, aux, page_size=block_size)
    shapes = sorted({(tuple(t.shape), tuple(t.stride())) for t in layers})[:3]
    raise ValueError(
        "kvroom cannot address these KV cache views block by block (shape, stride): "
        f"{shapes}; use a layer-compact layout such as VLLM_KV_CACHE_LAYOUT=LBNHC"
    )
