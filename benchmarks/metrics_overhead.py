"""Metrics cost: the room lifecycle through a manager's table with Prometheus metrics on versus off.

The lifecycle of ``fsm_overhead.py`` (create, every transition to Success,
clear) and a failed one (create, abort: the failure counter and the error
lookup), fired at a real ``KVManager``'s room table so records take the
manager's observer path (audit off in both, so only metrics differ).  The
cost that matters is the CPU time of the calling thread (``time.thread_time``),
best of the rounds.  The two managers' figures are measured interleaved in one
run.  Prints a table, or one JSON object with ``--json``.

    python benchmarks/metrics_overhead.py [--json] [--rounds N] [--n N]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(__file__))

import torch
from fsm_overhead import kvroom_lifecycle

from kvroom import KVManager, KVPool
from kvroom.fsm import Event, RoomTable
from kvroom.observe.metrics import KVMetrics


def failed_lifecycle(table: RoomTable, room_id: int) -> None:
    """Create and abort: the Failed path (failure counter, error type, latency)."""
    table.fire(table.create(room_id, 0.0), Event.ABORT, 0.0)


def per_call_us(fn: Callable[[int], None], n: int, first: int) -> float:
    """Calling-thread CPU microseconds per call over ``n`` calls."""
    gc.collect()
    c0 = time.thread_time()
    for i in range(n):
        fn(first + i)
    return (time.thread_time() - c0) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()

    def pool() -> KVPool:
        return KVPool([torch.zeros(16, 64, dtype=torch.uint8)], torch.zeros(4, 8, dtype=torch.uint8))

    metrics = KVMetrics()
    off = KVManager("prefill", pool(), audit=False)
    on = KVManager("prefill", pool(), audit=False, metrics=metrics)
    best: dict[str, float] = {}
    try:
        base = 10**9
        for r in range(args.rounds):  # interleaved, so drift hits both alike
            for name, manager in (("off", off), ("on", on)):
                for kind, fn in (("success", kvroom_lifecycle), ("failed", failed_lifecycle)):
                    first = base + (r * 4 + len(best) % 4) * args.n
                    us = per_call_us(lambda i, m=manager, f=fn: f(m.table, i), args.n, first)  # type: ignore[misc]
                    key = f"{name}_{kind}_us"
                    best[key] = min(best.get(key, float("inf")), us)
    finally:
        off.close()
        on.close()
    created = metrics.registry.get_sample_value("kvroom_rooms_created_total", {"role": "sender"})
    assert created == 2 * args.n * args.rounds, created
    out = {
        "ratio_metrics_on_vs_off": best["on_success_us"] / best["off_success_us"],
        "ratio_failed_on_vs_off": best["on_failed_us"] / best["off_failed_us"],
        "extra_us_per_lifecycle": best["on_success_us"] - best["off_success_us"],
        **best,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{'metrics':>10}{'success lifecycle us':>22}{'failed lifecycle us':>22}")
    for name in ("off", "on"):
        print(f"{name:>10}{best[f'{name}_success_us']:>22.2f}{best[f'{name}_failed_us']:>22.2f}")
    ratios = out["ratio_metrics_on_vs_off"], out["ratio_failed_on_vs_off"]
    print(f"ratio on / off: {ratios[0]:.2f} (success), {ratios[1]:.2f} (failed)")
    print(f"extra per successful lifecycle (6 records): {out['extra_us_per_lifecycle']:.2f} us")


if __name__ == "__main__":
    main()
