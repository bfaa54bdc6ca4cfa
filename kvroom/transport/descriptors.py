"""Vectorised NIXL descriptor lists for page transfers.

A transfer copies page ``src[i]`` to page ``dst[i]`` in every layer.  Runs
where both page lists are contiguous become one descriptor per layer, built
with numpy (no Python loop per page): ``(address, length, device)`` rows, the
Nx3 layout ``nixl_agent.get_xfer_descs`` takes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["page_runs", "row_descriptors", "run_descriptors", "validate_pages"]

IntArray = npt.NDArray[np.int64]
DescArray = npt.NDArray[np.uint64]


def validate_pages(pages: object, num_pages: int, what: str) -> IntArray:
    """Pages as an int64 array; raises ValueError/TypeError on bad input.

    Rejects non-integer dtypes, more than one dimension, negative or
    out-of-range indices, and duplicates.
    """
    try:
        import torch

        if isinstance(pages, torch.Tensor):
            pages = pages.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    arr = np.asarray(pages)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{what}: page indices must be integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{what}: page indices must be one-dimensional, got shape {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    low, high = int(arr.min()), int(arr.max())
    if low < 0:
        raise ValueError(f"{what}: negative page index {low}")
    if high >= num_pages:
        raise ValueError(f"{what}: page index {high} out of range for a pool of {num_pages} pages")
    if _has_duplicates(arr):
        raise ValueError(f"{what}: duplicate page indices")
    return arr


_SMALL = 512


def _has_duplicates(arr: IntArray) -> bool:
    """True when ``arr`` repeats a value.

    A chunk's few pages go through a Python set: ``np.unique`` (and ``np.sort``)
    release the GIL, and on a scheduler thread beside kvroom's busy worker each
    release costs a wait for the GIL to come back, several times the check.
    """
    if arr.size <= _SMALL:
        return len(set(arr.tolist())) != arr.size
    return bool(np.unique(arr).size != arr.size)


def page_runs(src: IntArray, dst: IntArray) -> tuple[IntArray, IntArray, IntArray]:
    """Maximal runs contiguous in both lists: (src starts, dst starts, lengths)."""
    n = src.size
    if n != dst.size:
        raise ValueError(f"{n} source pages but {dst.size} destination pages")
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    # slices and ufuncs rather than np.diff / np.concatenate: this runs once per chunk
    breaks = np.flatnonzero((src[1:] - src[:-1] != 1) | (dst[1:] - dst[:-1] != 1))
    bounds = np.empty(breaks.size + 2, dtype=np.int64)
    bounds[0], bounds[-1] = 0, n
    bounds[1:-1] = breaks + 1
    starts = bounds[:-1]
    return src[starts], dst[starts], bounds[1:] - starts


def run_descriptors(
    bases: Sequence[int], page_bytes: int, starts: IntArray, lengths: IntArray, device: int = 0
) -> DescArray:
    """One descriptor per (layer, run): rows ordered layer-major."""
    base = np.asarray(bases, dtype=np.uint64)[:, None]
    addr = base + starts.astype(np.uint64)[None, :] * np.uint64(page_bytes)
    length = np.broadcast_to(lengths.astype(np.uint64)[None, :] * np.uint64(page_bytes), addr.shape)
    out = np.empty((addr.size, 3), dtype=np.uint64)
    out[:, 0] = addr.ravel()
    out[:, 1] = length.ravel()
    out[:, 2] = device
    return out


def row_descriptors(
    bases: Sequence[int],
    page_bytes: int,
    pages: IntArray,
    rows: int,
    row_bytes: int,
    offset: int,
    length: int,
    device: int = 0,
) -> DescArray:
    """One descriptor per (layer, page, row): ``length`` bytes at ``offset`` in each row.

    For head slices that do not cover whole rows; rows are ordered layer-major,
    then page, then row, so a source and a destination list built with the same
    pages count pair up one to one.
    """
    base = np.asarray(bases, dtype=np.uint64)[:, None, None]
    addr = (
        base
        + pages.astype(np.uint64)[None, :, None] * np.uint64(page_bytes)
        + np.arange(rows, dtype=np.uint64)[None, None, :] * np.uint64(row_bytes)
        + np.uint64(offset)
    )
    out = np.empty((addr.size, 3), dtype=np.uint64)
    out[:, 0] = addr.ravel()
    out[:, 1] = length
    out[:, 2] = device
    return out
