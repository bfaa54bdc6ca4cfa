"""Audit cost: the room lifecycle with the audit log writing JSON lines versus audit off.

The lifecycle of ``fsm_overhead.py`` (create, every transition to Success,
clear: six audit events) through a real ``RoomTable``, side by side in one
run: with no observer; with :class:`~kvroom.observe.audit.AuditObserver` rendering
and writing each JSON line on the calling thread; and with that observer
behind :class:`~kvroom.observe.audit.BackgroundObserver`, which leaves the calling
thread only a queue append.  The cost that matters to a scheduler is the CPU
time of its own thread (``time.thread_time``); the writer thread's CPU and the
wall time until every line is on disk are reported next to it.  Prints a
table, or one JSON object with ``--json``.

    python benchmarks/audit_overhead.py [--json] [--rounds N] [--n N]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(__file__))

from fsm_overhead import kvroom_lifecycle

from kvroom.fsm import Role, RoomTable
from kvroom.observe.audit import AuditObserver, BackgroundObserver, json_lines_logger


def measure(fn: Callable[[int], None], n: int, rounds: int, after: Callable[[], None]) -> tuple[float, float]:
    """Best-of-rounds (calling-thread CPU us, wall us including ``after``) per call."""
    cpu, wall = float("inf"), float("inf")
    base = 10**9
    for r in range(rounds):
        gc.collect()
        w0, c0 = time.perf_counter(), time.thread_time()
        for i in range(n):
            fn(base + r * n + i)
        c1 = time.thread_time()
        after()
        w1 = time.perf_counter()
        cpu, wall = min(cpu, (c1 - c0) / n), min(wall, (w1 - w0) / n)
    return cpu * 1e6, wall * 1e6


def writer_cpu(thread_name: str) -> float:
    """CPU seconds of the named thread so far (Linux /proc)."""
    for t in threading.enumerate():
        if t.name == thread_name and t.native_id is not None:
            with open(f"/proc/self/task/{t.native_id}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        off = RoomTable(Role.SENDER)
        sync_obs = AuditObserver(
            json_lines_logger(os.path.join(tmp, "sync.jsonl")), role="sender", process="b"
        )
        sync = RoomTable(Role.SENDER, observer=sync_obs)
        bg_obs = BackgroundObserver(
            AuditObserver(json_lines_logger(os.path.join(tmp, "bg.jsonl")), role="sender", process="b")
        )
        bg = RoomTable(Role.SENDER, observer=bg_obs)
        nothing: Callable[[], None] = lambda: None  # noqa: E731
        off_cpu, off_wall = measure(lambda i: kvroom_lifecycle(off, i), args.n, args.rounds, nothing)
        sync_cpu, sync_wall = measure(lambda i: kvroom_lifecycle(sync, i), args.n, args.rounds, nothing)
        before = writer_cpu("kvroom-audit")
        bg_cpu, bg_wall = measure(lambda i: kvroom_lifecycle(bg, i), args.n, args.rounds, bg_obs.flush)
        writer_us = (writer_cpu("kvroom-audit") - before) / (args.n * args.rounds) * 1e6
        bg_obs.close()
        lines = {name: sum(1 for _ in open(os.path.join(tmp, f"{name}.jsonl"))) for name in ("sync", "bg")}  # noqa: SIM115
    total = args.n * args.rounds
    assert lines["sync"] == lines["bg"] == 6 * total, lines  # created, 4 transitions, cleanup
    out = {
        "ratio_audit_on_vs_off": bg_cpu / off_cpu,
        "ratio_sync_audit_vs_off": sync_cpu / off_cpu,
        "ratio_wall_until_written_vs_off": bg_wall / off_wall,
        "off_us": off_cpu,
        "background_us": bg_cpu,
        "writer_thread_us": writer_us,
        "sync_us": sync_cpu,
        "lines_per_lifecycle": lines["bg"] / total,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{'audit':>22}{'caller CPU us':>15}{'wall us (all written)':>23}")
    print(f"{'off':>22}{off_cpu:>15.2f}{off_wall:>23.2f}")
    print(f"{'on, background writer':>22}{bg_cpu:>15.2f}{bg_wall:>23.2f}")
    print(f"{'on, same thread':>22}{sync_cpu:>15.2f}{sync_wall:>23.2f}")
    lines_each = out["lines_per_lifecycle"]
    print(f"writer thread CPU per lifecycle: {writer_us:.2f} us; {lines_each:.0f} JSON lines each")
    print(f"ratio audit on / off (scheduler thread): {out['ratio_audit_on_vs_off']:.2f}  (target <= 2)")
    print(f"same-thread audit / off:                 {out['ratio_sync_audit_vs_off']:.2f}")


if __name__ == "__main__":
    main()
