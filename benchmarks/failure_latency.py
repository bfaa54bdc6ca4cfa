"""Failure latency: SIGKILL of decode -> every room Failed and clean on prefill;
SIGSTOP of decode -> the Transferring deadline firing, relative to that deadline.

This process runs the prefill manager; a spawned child runs decode with
``--rooms`` receivers.  Every room is mid-transfer (its first chunk sent, more
to come) when decode is killed; the time of each room's Failed transition is
taken from the prefill observer.  For the stop case, decode is SIGSTOPped as
soon as the rooms are Transferring; nothing else can fail them before their
deadline (the heartbeat timeout is longer), and the overrun is (time in
Transferring) / deadline.  Prints a table, or one JSON object with ``--json``.

    python benchmarks/failure_latency.py [--json] [--rooms N] [--trials N] [--deadline S]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import statistics
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

PAGES, PAGE_BYTES = 8, 64 << 10


def _pool(rooms: int) -> Any:
    from kvroom import KVPool

    return KVPool(
        [torch.zeros(rooms * PAGES, PAGE_BYTES, dtype=torch.uint8)], torch.zeros(8, 8, dtype=torch.uint8)
    )


def decode_main(conn: Connection, addr: str, rooms: int, first: int, heartbeat: tuple[float, float]) -> None:
    from kvroom import KVManager, KVReceiver, ManagerConfig
    from kvroom.demo.nodes import die_with_parent

    die_with_parent()
    config = ManagerConfig(heartbeat_interval=heartbeat[0], heartbeat_timeout=heartbeat[1])
    manager = KVManager("decode", _pool(rooms), config=config, audit=False)
    for i in range(rooms):
        rx = KVReceiver(manager, addr, first + i)
        rx.init()
        rx.send_metadata(np.arange(i * PAGES, (i + 1) * PAGES))
    conn.send("ready")
    conn.recv()  # wait to be killed or stopped


class Times:
    """Observer: when each room entered Transferring and Failed (prefill clock)."""

    def __init__(self) -> None:
        self.transferring: dict[int, float] = {}
        self.failed: dict[int, float] = {}

    def on_transition(self, record: Any) -> None:
        from kvroom import KVPoll

        if record.dst is KVPoll.Transferring and record.src is not KVPoll.Transferring:
            self.transferring[record.room] = record.time
        elif record.dst is KVPoll.Failed:
            self.failed[record.room] = record.time

    def on_cleanup(self, record: Any) -> None:
        pass

    def on_ignored(self, record: Any) -> None:
        pass


def trial(rooms: int, first: int, stop: bool, deadline: float) -> tuple[list[float], Times]:
    """One decode child; returns per-room latency (s) from the signal, and the times."""
    from kvroom import KVManager, KVPoll, KVSender, ManagerConfig
    from kvroom.fsm import Deadlines

    heartbeat = (0.5, 60.0) if stop else (0.1, 5.0)
    config = ManagerConfig(
        deadlines=Deadlines(30.0, 60.0, deadline if stop else 60.0),
        heartbeat_interval=heartbeat[0],
        heartbeat_timeout=heartbeat[1],
    )
    times = Times()
    prefill = KVManager("prefill", _pool(rooms), config=config, observer=times)
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(
        target=decode_main, args=(child, prefill.bootstrap_addr, rooms, first, heartbeat), daemon=True
    )
    proc.start()
    try:
        conn.recv()
        senders = [KVSender(prefill, None, first + i) for i in range(rooms)]
        while not all(s.poll() is KVPoll.WaitingForInput for s in senders):
            time.sleep(0.001)
        for i, s in enumerate(senders):
            s.init(PAGES)
            s.send(np.arange(i * PAGES, i * PAGES + PAGES // 2))  # mid-transfer: half the pages
        while len(times.transferring) < rooms:
            time.sleep(0.001)
        if stop:
            os.kill(proc.pid or 0, signal.SIGSTOP)
        else:
            proc.kill()
        t0 = prefill.clock()
        while not all(s.poll() is KVPoll.Failed for s in senders):
            time.sleep(0.001)
        assert all(prefill.footprint(first + i) == frozenset() for i in range(rooms)), "state left behind"
        return [times.failed[first + i] - t0 for i in range(rooms)], times
    finally:
        if proc.is_alive():
            os.kill(proc.pid or 0, signal.SIGCONT)
            proc.kill()
        proc.join(10)
        prefill.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rooms", type=int, default=64)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument(
        "--deadline", type=float, default=1.0, help="Transferring deadline for the stop case (s)"
    )
    args = parser.parse_args()
    kill_ms: list[float] = []
    for t in range(args.trials):
        lat, _ = trial(args.rooms, t * 10_000, stop=False, deadline=args.deadline)
        kill_ms.extend(x * 1e3 for x in lat)
    overrun: list[float] = []
    for t in range(args.trials):
        _, times = trial(args.rooms, (args.trials + t) * 10_000, stop=True, deadline=args.deadline)
        overrun.extend((times.failed[r] - times.transferring[r]) / args.deadline for r in times.failed)
    out = {
        "kill_to_failed_ms_p50": statistics.median(kill_ms),
        "kill_to_failed_ms_max": max(kill_ms),
        "stop_deadline_overrun_ratio": max(overrun),
        "stop_deadline_overrun_ratio_p50": statistics.median(overrun),
        "rooms": args.rooms,
        "trials": args.trials,
        "deadline_s": args.deadline,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{args.rooms} rooms mid-transfer, {args.trials} trials each")
    print(
        f"SIGKILL decode -> room Failed and clean on prefill: p50 {out['kill_to_failed_ms_p50']:.1f} ms, ",
        end="",
    )
    print(f"max {out['kill_to_failed_ms_max']:.1f} ms")
    print(f"SIGSTOP decode -> Transferring deadline ({args.deadline:g} s) fired at ", end="")
    print(f"{out['stop_deadline_overrun_ratio_p50']:.3f}x p50, {out['stop_deadline_overrun_ratio']:.3f}x max")


if __name__ == "__main__":
    main()
