"""How a WRITE's target learns it landed: a NIXL notification, or a ZMQ message at DONE.

Two processes on this machine (NIXL, UCX, DRAM, no progress threads), one WRITE at a time of
each size. ``notif``: the WRITE carries a NIXL notification and the target polls
``get_new_notifs`` every ``tick`` seconds (0: spins); ``zmq``: the WRITE carries none, the
initiator sends one ZMQ message once the WRITE is DONE, and the target waits on its socket (one
NIXL progress call per turn, as kvroom's decode worker). Printed per mode, size and tick: p50
from posting to DONE on the initiator, and to the target seeing the WRITE (one monotonic clock).
Protocol 7 of kvroom (WRITTEN) rests on the difference: with a notification DONE itself waits for
the target's progress.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from multiprocessing.connection import Connection
from typing import Any

import torch
import zmq
from _agents import _agent

SIZES = (4096, 512 << 10, 4 << 20)
TICKS = (0.0, 0.0002, 0.001)


def _target(conn: Connection, nbytes: int, mode: str, tick: float, port: int) -> None:
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    b = _agent(f"announce-b-{mode}")
    b.register_memory(dst)
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.bind(f"tcp://127.0.0.1:{port}")
    conn.send((b.get_agent_metadata(), b.get_serialized_descs(b.get_xfer_descs(dst))))
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while not conn.poll():
        if mode == "notif":
            if b.get_new_notifs():
                conn.send(time.monotonic())
            if tick:
                time.sleep(tick)
        else:
            b.get_new_notifs()  # progress only
            if poller.poll(5):
                sock.recv()
                conn.send(time.monotonic())
    sock.close(0)


def measure(nbytes: int, mode: str, tick: float, repeat: int, port: int) -> dict[str, float]:
    """p50 ms from post to DONE and to the target seeing the WRITE."""
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_target, args=(there, nbytes, mode, tick, port), daemon=True)
    proc.start()
    try:
        metadata, descs = here.recv()
        src = torch.ones(nbytes, dtype=torch.uint8)
        a = _agent(f"announce-a-{mode}")
        a.register_memory(src)
        peer = a.add_remote_agent(metadata)
        local, remote = a.get_xfer_descs(src), a.deserialize_descs(descs)
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{port}")
        done, seen = [], []
        for i in range(repeat + 5):
            start = time.monotonic()
            if mode == "notif":
                handle = a.initialize_xfer("WRITE", local, remote, peer, b"x")
            else:
                handle = a.initialize_xfer("WRITE", local, remote, peer)
            state = a.transfer(handle)
            while state != "DONE":
                state = a.check_xfer_state(handle)
            finished = time.monotonic()
            if mode == "zmq":
                push.send(b"written")
            saw = here.recv()
            a.release_xfer_handle(handle)
            if i >= 5:  # the first WRITEs set up the connection
                done.append(finished - start)
                seen.append(saw - start)
            time.sleep(0.003)  # the target is somewhere in its tick, as in a serving engine
        push.close(0)
        return {"done_ms": 1000 * statistics.median(done), "seen_ms": 1000 * statistics.median(seen)}
    finally:
        here.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--repeat", type=int, default=100, help="WRITEs per case")
    parser.add_argument("--port", type=int, default=5611)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for nbytes in SIZES:
        for mode, ticks in (("notif", TICKS), ("zmq", (None,))):
            for tick in ticks:
                got = measure(nbytes, mode, tick or 0.0, args.repeat, args.port)
                tick_ms = None if tick is None else 1000 * tick
                rows.append({"bytes": nbytes, "mode": mode, "tick_ms": tick_ms, **got})
    if args.json:
        print(json.dumps({"rows": rows}))
        return
    print(f"{'bytes':>8} {'mode':>6} {'tick ms':>8} {'DONE ms':>8} {'seen ms':>8}")
    for r in rows:
        tick = "wait" if r["tick_ms"] is None else f"{r['tick_ms']:g}"
        print(f"{r['bytes']:>8} {r['mode']:>6} {tick:>8} {r['done_ms']:>8.3f} {r['seen_ms']:>8.3f}")


if __name__ == "__main__":
    main()
