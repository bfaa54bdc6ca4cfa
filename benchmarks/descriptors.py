"""Descriptor building: kvroom's vectorised runs versus a per-page Python loop.

100k pages (a request's page list as a paged allocator hands it out: runs of
1 to 32 consecutive pages in shuffled order) mapped to as many destination
pages, for every layer.  kvroom finds runs contiguous on both sides and emits
one ``(addr, len, dev)`` row per (layer, run) with numpy; the baseline walks
pages in Python and emits one row per (layer, page), the way engines build
NIXL descriptor lists today.  Both build source and destination lists.
Prints a table, or one JSON object with ``--json``.

    python benchmarks/descriptors.py [--json] [--pages N] [--layers N] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from kvroom.transport.descriptors import page_runs, run_descriptors


def realistic_pages(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct page indices in runs of 1..32, runs shuffled."""
    lengths = []
    total = 0
    while total < n:
        length = int(min(rng.integers(1, 33), n - total))
        lengths.append(length)
        total += length
    starts = np.cumsum([0, *lengths[:-1]])
    runs = [np.arange(s, s + k) for s, k in zip(starts, lengths, strict=True)]
    order = rng.permutation(len(runs))
    return np.concatenate([runs[i] for i in order]).astype(np.int64)


def kvroom_build(
    src: np.ndarray, dst: np.ndarray, bases: list[int], page_bytes: int
) -> tuple[np.ndarray, ...]:
    """kvroom's path: runs on both sides, then one row per (layer, run)."""
    s, d, n = page_runs(src, dst)
    return run_descriptors(bases, page_bytes, s, n), run_descriptors(bases, page_bytes, d, n)


def loop_build(src: np.ndarray, dst: np.ndarray, bases: list[int], page_bytes: int) -> tuple[np.ndarray, ...]:
    """The baseline: a Python loop over layers and pages."""
    local, remote = [], []
    for base in bases:
        for s, d in zip(src.tolist(), dst.tolist(), strict=True):
            local.append((base + s * page_bytes, page_bytes, 0))
            remote.append((base + d * page_bytes, page_bytes, 0))
    return np.array(local, dtype=np.uint64), np.array(remote, dtype=np.uint64)


def best(fn: object, rounds: int, *args: object) -> float:
    out = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn(*args)  # type: ignore[operator]
        out = min(out, time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--pages", type=int, default=100_000)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    src = realistic_pages(args.pages, rng)
    dst = realistic_pages(args.pages, rng)
    bases = [1 << 32 + 4 * i for i in range(args.layers)]
    page_bytes = 64 << 10
    fast = kvroom_build(src, dst, bases, page_bytes)
    slow = loop_build(src, dst, bases, page_bytes)
    # same bytes moved: the rows cover the same (src, dst) byte pairs
    assert int(fast[0][:, 1].sum()) == int(slow[0][:, 1].sum())
    t_fast = best(kvroom_build, args.rounds, src, dst, bases, page_bytes)
    t_slow = best(loop_build, max(1, args.rounds // 2), src, dst, bases, page_bytes)
    out = {
        "speedup_vs_loop": t_slow / t_fast,
        "kvroom_ms": t_fast * 1e3,
        "loop_ms": t_slow * 1e3,
        "kvroom_rows": int(fast[0].shape[0]),
        "loop_rows": int(slow[0].shape[0]),
        "pages": args.pages,
        "layers": args.layers,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{'builder':>10}{'ms':>10}{'rows per side':>16}")
    print(f"{'kvroom':>10}{out['kvroom_ms']:>10.2f}{out['kvroom_rows']:>16}")
    print(f"{'loop':>10}{out['loop_ms']:>10.2f}{out['loop_rows']:>16}")
    print(
        f"{args.pages} pages x {args.layers} layers; speedup: {out['speedup_vs_loop']:.0f}x  (target >= 50)"
    )


if __name__ == "__main__":
    main()
