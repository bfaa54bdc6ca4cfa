"""Descriptor building: kvroom's vectorised planning versus a per-page Python loop.

Three cases, each building source and destination ``(addr, len, dev)`` rows:

* ``pages``: 100k pages (a request's page list as a paged allocator hands it
  out: runs of 1 to 32 consecutive pages in shuffled order) mapped to as many
  destination pages, for every layer: ``page_runs`` + ``run_descriptors``.
* ``mla``: the ``deepseek-v3`` preset at its full 61 layers, a 128k-token
  request (2048 pages of 64 tokens), prefill TP 4 -> decode TP 2: for each
  decode rank, ``kvroom.planning.PairRoute.writes`` from every prefill rank (two of
  the four write, the others only take part in the verdict), plus aux rows.
* ``pp``: the ``llama3-8b`` preset at its full 32 layers, a 128k-token request
  (8192 pages of 16 tokens), prefill PP 2 -> decode PP 1: both stages' plans.

The baseline walks layers and pages in Python and emits one row per (buffer,
page), the way engines build NIXL descriptor lists today.  The planner's rows
are expanded to pages and checked to cover exactly the loop's (src, dst)
pairs.  Assignments and routes (``assign``, ``route``) are built once per set
of rank pairs, as managers cache them, and timed separately.  Prints a
table, or one JSON object with ``--json``.

    python benchmarks/descriptors.py [--json] [--pages N] [--layers N] [--rounds N] [--case NAME]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kvroom.planning import (
    Assignment,
    PairRoute,
    RankRegions,
    align_chunk,
    assign,
    for_source,
    route,
    synthetic_pool,
)
from kvroom.presets import get_preset
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


Rows = tuple[np.ndarray, np.ndarray]


def bind(
    sources: list[RankRegions], destinations: list[RankRegions], src_lay: list[Any], dst_lay: list[Any]
) -> tuple[list[tuple[Assignment, ...]], list[PairRoute]]:
    """Once per set of rank pairs (managers cache it): assignments, and a route per pair."""
    tables = [assign(d, src_lay) for d in dst_lay]
    routes = [
        route(s, d, for_source(table, i))
        for d, table in zip(destinations, tables, strict=True)
        for i, s in enumerate(sources)
    ]
    return tables, routes


def plan_room(routes: list[PairRoute], src: np.ndarray, dst: np.ndarray) -> Rows:
    """kvroom's planner: every (source, destination) pair's plan for one whole-room chunk."""
    chunk = align_chunk(src, 0, dst, 0, last=True, aux=(3, 5))
    local, remote = [], []
    for r in routes:
        plan = r.writes(chunk)
        if plan is not None:
            local.extend(p.local for p in plan.parts)
            remote.extend(p.remote for p in plan.parts)
    return np.concatenate(local), np.concatenate(remote)


def loop_room(
    sources: list[RankRegions],
    destinations: list[RankRegions],
    tables: list[tuple[Assignment, ...]],
    src: np.ndarray,
    dst: np.ndarray,
) -> Rows:
    """The baseline: for each pair, a Python loop over buffers and pages (and the aux rows)."""
    local, remote = [], []
    for d, table in zip(destinations, tables, strict=True):
        for i, s in enumerate(sources):
            for key in dict.fromkeys(a.key for a in for_source(table, i)):
                sr, dr = s.regions[key], d.regions[key]
                aux = s.layout.model.by_key[key].space == "aux"
                pairs = [(3, 5)] if aux else zip(src.tolist(), dst.tolist(), strict=True)
                for p, q in pairs:
                    local.append((sr.addr + p * sr.item_bytes, sr.item_bytes, sr.device))
                    remote.append((dr.addr + q * dr.item_bytes, dr.item_bytes, dr.device))
    return np.array(local, dtype=np.uint64), np.array(remote, dtype=np.uint64)


def expand(rows: Rows, item_of: Callable[[int], int]) -> set[tuple[int, int]]:
    """(src, dst) item addresses that descriptor rows cover, runs split into items."""
    out: set[tuple[int, int]] = set()
    for (la, ln, _), (ra, _, _) in zip(rows[0].tolist(), rows[1].tolist(), strict=True):
        item = item_of(la)
        out.update((la + k * item, ra + k * item) for k in range(ln // item))
    return out


def preset_case(
    name: str, layers: int, pages: int, m: tuple[int, int], n: tuple[int, int], rounds: int
) -> dict[str, Any]:
    """Plan one room of ``pages`` pages from prefill (tp, pp) ``m`` into decode (tp, pp) ``n``."""
    preset = get_preset(name, layers=layers)
    items = preset.items(max(pages, 1) * 2, 8)
    src_lay = [preset.rank(t, m[0], p, m[1]) for p in range(m[1]) for t in range(m[0])]
    dst_lay = [preset.rank(t, n[0], p, n[1]) for p in range(n[1]) for t in range(n[0])]
    sources = [
        RankRegions(s, synthetic_pool(s, items, base=(1 << 40) * (i + 1))) for i, s in enumerate(src_lay)
    ]
    dests = [
        RankRegions(d, synthetic_pool(d, items, base=(1 << 52) + (1 << 40) * i))
        for i, d in enumerate(dst_lay)
    ]
    start = time.perf_counter()
    tables, routes = bind(sources, dests, src_lay, dst_lay)
    t_bind = time.perf_counter() - start
    rng = np.random.default_rng(1)
    src = realistic_pages(pages, rng)
    dst = realistic_pages(pages, rng) + pages
    fast = plan_room(routes, src, dst)
    slow = loop_room(sources, dests, tables, src, dst)
    items_by_addr = sorted((r.addr, r.item_bytes) for s in sources for r in s.pool)
    starts = np.array([a for a, _ in items_by_addr], dtype=np.uint64)

    def item_of(addr: int) -> int:
        return items_by_addr[int(np.searchsorted(starts, np.uint64(addr), side="right")) - 1][1]

    assert int(fast[0][:, 1].sum()) == int(slow[0][:, 1].sum())
    assert expand(fast, item_of) == {
        (int(a), int(b)) for a, b in zip(slow[0][:, 0], slow[1][:, 0], strict=True)
    }
    t_fast = best(plan_room, rounds, routes, src, dst)
    t_slow = best(loop_room, max(1, rounds // 2), sources, dests, tables, src, dst)
    return {
        "speedup_vs_loop": t_slow / t_fast,
        "kvroom_ms": t_fast * 1e3,
        "loop_ms": t_slow * 1e3,
        "bind_ms": t_bind * 1e3,
        "speedup_incl_bind": t_slow / (t_fast + t_bind),
        "kvroom_rows": int(fast[0].shape[0]),
        "loop_rows": int(slow[0].shape[0]),
        "pages": pages,
        "layers": layers,
        "setup": f"{name} prefill tp{m[0]} pp{m[1]} -> decode tp{n[0]} pp{n[1]}",
    }


def pages_case(pages: int, layers: int, rounds: int) -> dict[str, Any]:
    """The page-list case: runs versus a per-page loop."""
    rng = np.random.default_rng(0)
    src = realistic_pages(pages, rng)
    dst = realistic_pages(pages, rng)
    bases = [1 << 32 + 4 * i for i in range(layers)]
    page_bytes = 64 << 10
    fast = kvroom_build(src, dst, bases, page_bytes)
    slow = loop_build(src, dst, bases, page_bytes)
    # same bytes moved: the rows cover the same (src, dst) byte pairs
    assert int(fast[0][:, 1].sum()) == int(slow[0][:, 1].sum())
    t_fast = best(kvroom_build, rounds, src, dst, bases, page_bytes)
    t_slow = best(loop_build, max(1, rounds // 2), src, dst, bases, page_bytes)
    return {
        "speedup_vs_loop": t_slow / t_fast,
        "kvroom_ms": t_fast * 1e3,
        "loop_ms": t_slow * 1e3,
        "kvroom_rows": int(fast[0].shape[0]),
        "loop_rows": int(slow[0].shape[0]),
        "pages": pages,
        "layers": layers,
        "setup": f"{pages} pages x {layers} layers",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--pages", type=int, default=100_000, help="pages of the 'pages' case")
    parser.add_argument("--layers", type=int, default=4, help="layers of the 'pages' case")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--case", choices=["pages", "mla", "pp"], action="append")
    args = parser.parse_args()
    cases = args.case or ["pages", "mla", "pp"]
    out: dict[str, dict[str, Any]] = {}
    if "pages" in cases:
        out["pages"] = pages_case(args.pages, args.layers, args.rounds)
    if "mla" in cases:
        out["mla"] = preset_case("deepseek-v3", 61, 2048, (4, 1), (2, 1), args.rounds)
    if "pp" in cases:
        out["pp"] = preset_case("llama3-8b", 32, 8192, (1, 2), (1, 1), args.rounds)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    head = f"{'case':>6}{'kvroom ms':>11}{'loop ms':>10}{'kvroom rows':>13}{'loop rows':>11}"
    print(f"{head}{'speedup':>9}  setup")
    for name, r in out.items():
        print(
            f"{name:>6}{r['kvroom_ms']:>11.2f}{r['loop_ms']:>10.2f}{r['kvroom_rows']:>13}{r['loop_rows']:>11}"
            f"{r['speedup_vs_loop']:>8.0f}x  {r['setup']}"
        )
    for name, r in out.items():
        if "bind_ms" in r:
            print(
                f"{name}: assign + route, once per set of rank pairs (managers cache them): "
                f"{r['bind_ms']:.2f} ms; speedup counting it in every room: {r['speedup_incl_bind']:.0f}x"
            )
    print("target: >= 50x each")


if __name__ == "__main__":
    main()
