"""Where one room's time goes, from prefill's ``send()`` to decode's scheduler seeing Success.

Prefill runs in this process and decode in a child, each bound to its own core (prefill 0,
decode 1, every thread), each scheduler polling its room every ``--poll-us`` (100) as an
engine's loop would. Rooms go one at a time: decode sends its page list, prefill sends the
room's pages in ``--chunks`` chunks back to back, and both poll to Success. Timestamps (one
monotonic clock across the processes) come from wrappers around three internal methods, so this
program follows the tree's internals and fails at once if one is renamed:
``PrefillWrites._post`` (a batch of WRITEs posted as one transfer), ``PrefillWrites._done`` (its
DONE, the room's COMPLETE and the WRITTEN sent) and ``DecodeRooms._on_written`` (decode's
worker handling it). Printed: the median of each step, and beside them a raw NIXL WRITE of the
same bytes to another process (``_agents.announced_write_ms``): its DONE and a target told over ZMQ
at DONE seeing it.

The defaults are one vLLM-sized room of the tiny model in ``vllm_pd.py`` (512 KiB: 2 pages of
64 KiB in 4 buffers, one chunk); ``--pages 64 --page-kib 32 --buffers 2 --chunks 4`` is the
4 MiB room of ``sglang_backend.py``.

    .venv/bin/python benchmarks/one_room.py [--rooms 300] [--pages 2] [--page-kib 64]
        [--buffers 4] [--chunks 1] [--poll-us 100] [--json]
"""

from __future__ import annotations

import argparse
import bisect
import json
import multiprocessing
import os
import statistics
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch
from _agents import announced_write_ms

WARMUP = 30  # rooms not counted: connections, first registrations, caches
POOL_ROOMS = 3  # a room's pages rotate over this many disjoint page sets


def _pool(args: argparse.Namespace) -> Any:
    from kvroom import KVPool

    pages = POOL_ROOMS * args.pages
    bufs = [torch.zeros(pages, args.page_kib << 10, dtype=torch.uint8) for _ in range(args.buffers)]
    return KVPool(bufs, torch.zeros(8, 16, dtype=torch.uint8))


def _stamped(cls: Any, name: str, before: list[float] | None, after: list[float] | None) -> None:
    """Wrap ``cls.name`` to append the time on entry to ``before`` and on return to ``after``."""
    inner = getattr(cls, name)

    def wrapper(*a: Any, **k: Any) -> Any:
        if before is not None:
            before.append(time.monotonic())
        try:
            return inner(*a, **k)
        finally:
            if after is not None:
                after.append(time.monotonic())

    setattr(cls, name, wrapper)


def _decode(conn: Connection, args: argparse.Namespace) -> None:
    os.sched_setaffinity(0, {1})
    from kvroom import KVManager, KVPoll, KVReceiver
    from kvroom.node.decode_rooms import DecodeRooms

    handled: list[float] = []
    _stamped(DecodeRooms, "_on_written", None, handled)
    mgr = KVManager("decode", _pool(args), audit=False)
    addr = conn.recv()
    seen: list[float] = []
    while (msg := conn.recv()) is not None:
        room, first = msg
        rx = KVReceiver(mgr, addr, room)
        rx.init()
        rx.send_metadata(np.arange(first, first + args.pages), aux_index=1)
        conn.send("opened")
        while (state := rx.poll()) not in (KVPoll.Success, KVPoll.Failed):
            time.sleep(args.poll_us / 1e6)
        seen.append(time.monotonic())
        rx.clear()
        conn.send(state is KVPoll.Success)
    conn.send((handled, seen))
    mgr.close()


def _med(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=300)
    parser.add_argument("--pages", type=int, default=2, help="pages a room")
    parser.add_argument("--page-kib", type=int, default=64, help="KiB of one page in one buffer")
    parser.add_argument("--buffers", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=1, help="send() calls a room")
    parser.add_argument("--poll-us", type=float, default=100.0, help="schedulers' polling interval")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.pages % args.chunks:
        parser.error("--pages must be a multiple of --chunks")
    os.sched_setaffinity(0, {0})
    from kvroom import KVManager, KVPoll, KVSender
    from kvroom.node.prefill_writes import PrefillWrites

    posted: list[float] = []
    done: list[float] = []
    written: list[float] = []
    _stamped(PrefillWrites, "_post", posted, None)
    _stamped(PrefillWrites, "_done", done, written)
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_decode, args=(there, args), daemon=True)
    child.start()
    mgr = KVManager("prefill", _pool(args), audit=False)
    rows: list[dict[str, float]] = []
    try:
        here.send(mgr.bootstrap_addr)
        step = args.pages // args.chunks
        for i in range(WARMUP + args.rooms):
            room, first = 1000 + i, (i % POOL_ROOMS) * args.pages
            here.send((room, first))
            here.recv()
            tx = KVSender(mgr, mgr.bootstrap_addr, room)
            while tx.poll() is not KVPoll.WaitingForInput:
                time.sleep(args.poll_us / 1e6)
            tx.init(args.pages, aux_index=2)
            src = np.arange(first, first + args.pages)
            del posted[:], done[:], written[:]
            start = time.monotonic()
            for c in range(args.chunks):
                tx.send(src[c * step : (c + 1) * step])
            while (state := tx.poll()) not in (KVPoll.Success, KVPoll.Failed):
                time.sleep(args.poll_us / 1e6)
            seen = time.monotonic()
            tx.clear()
            if state is not KVPoll.Success or not here.recv():
                raise RuntimeError(f"room {room} failed")
            if i >= WARMUP:
                at = {"start": start, "post": posted[0], "done": done[-1], "written": written[-1]}
                rows.append({**at, "seen": seen})
        here.send(None)
        handled, decode_seen = here.recv()
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
        mgr.close()
    decode_seen = decode_seen[WARMUP:]
    # decode's worker handled the room's WRITTEN at the first _on_written return after it was sent
    handled_at = [handled[bisect.bisect_left(handled, r["written"])] for r in rows]
    steps = {
        "send_to_post": _med([r["post"] - r["start"] for r in rows]),
        "post_to_done": _med([r["done"] - r["post"] for r in rows]),
        "done_to_written_sent": _med([r["written"] - r["done"] for r in rows]),
        "written_to_decode_handled": _med([h - r["written"] for h, r in zip(handled_at, rows, strict=True)]),
        "decode_handled_to_seen": _med([s - h for s, h in zip(decode_seen, handled_at, strict=True)]),
        "prefill_send_to_seen": _med([r["seen"] - r["start"] for r in rows]),
        "decode_send_to_seen": _med([s - r["start"] for s, r in zip(decode_seen, rows, strict=True)]),
    }
    nbytes = args.pages * args.buffers * (args.page_kib << 10)
    raw_done, raw_seen = announced_write_ms(nbytes)
    out = {
        "room_bytes": nbytes,
        "rooms": len(rows),
        "steps_ms_p50": steps,
        "raw_write_done_ms_p50": round(raw_done, 3),
        "raw_write_announced_ms_p50": round(raw_seen, 3),
    }
    if args.json:
        print(json.dumps(out))
        return
    print(f"one room of {nbytes} bytes, {args.chunks} chunk(s), {len(rows)} rooms one at a time (ms, p50)")
    for name, value in steps.items():
        print(f"  {name:28} {value:8.3f}")
    print(
        f"raw WRITE of the same bytes to another process: DONE {out['raw_write_done_ms_p50']} ms, "
        f"seen by a target told over ZMQ at DONE {out['raw_write_announced_ms_p50']} ms"
    )


if __name__ == "__main__":
    main()
