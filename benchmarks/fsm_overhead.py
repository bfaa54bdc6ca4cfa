"""State machine overhead: kvroom's room table versus a dict of statuses.

A full room lifecycle (create, every transition to Success, clear) through
kvroom's real ``RoomTable``, next to the way engines track rooms today (a dict
of IntEnum statuses with a transition-table check), at 0, 10k and 100k live
rooms; plus a lifecycle that ends in Failed with cleanup of every store, and
the memory each live room costs.  Prints a table, or one JSON object with
``--json``.

    python benchmarks/fsm_overhead.py [--json] [--rounds N]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import tracemalloc
from collections.abc import Callable

from kvroom.fsm import Event, KVPoll, Role, RoomTable

B, W, T, S = KVPoll.Bootstrapping, KVPoll.WaitingForInput, KVPoll.Transferring, KVPoll.Success
ALLOWED = {(B, "info"): W, (W, "send"): T, (T, "send"): T, (T, "done"): S}


def dict_lifecycle(rooms: dict[int, KVPoll], room_id: int) -> None:
    """The baseline: a status dict and a table check per event."""
    rooms[room_id] = B
    for event in ("info", "send", "done"):
        rooms[room_id] = ALLOWED[(rooms[room_id], event)]
    del rooms[room_id]


def kvroom_lifecycle(table: RoomTable, room_id: int) -> None:
    """Create, every transition to Success, clear."""
    room = table.create(room_id, 0.0)
    table.fire(room, Event.DST_INFO, 0.0, infos=1)
    table.fire(room, Event.SEND, 0.0)
    table.fire(room, Event.COMPLETE, 0.0, chunks=0, aux=True)
    table.fire(room, Event.CLEAR, 0.0)


def kvroom_failure(table: RoomTable, room_id: int) -> None:
    """Create, fill every store, fail (the cleanup empties every store)."""
    room = table.create(room_id, 0.0)
    table.transfer_infos.put(room, room_id)
    table.decode_prefix_lens.put(room, 0)
    table.failure_records.put(room, "x")
    assert table.prefetched_rooms is not None and table.prefetch_requested is not None
    table.prefetched_rooms.put(room, 1)
    table.prefetch_requested.put(room, (room_id, 0, 0), 1)
    table.fire(room, Event.TRANSPORT_ERROR, 0.0)


def per_op(fn: Callable[[int], None], n: int, rounds: int) -> float:
    """Best-of-rounds seconds per call."""
    best = float("inf")
    base = 10**9
    for r in range(rounds):
        gc.collect()
        start = time.perf_counter()
        for i in range(n):
            fn(base + r * n + i)
        best = min(best, (time.perf_counter() - start) / n)
    return best


def populate(table: RoomTable, live: int) -> None:
    for i in range(live):
        room = table.create(i, 0.0)
        table.fire(room, Event.DST_INFO, 0.0, infos=1)


def bytes_per_room(count: int = 20000) -> float:
    """Memory of a live room in WaitingForInput with a transfer info stored."""
    table = RoomTable(Role.SENDER)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(count):
        room = table.create(i, 0.0)
        table.fire(room, Event.DST_INFO, 0.0, infos=1)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    results: dict[str, float] = {}
    for live in (0, 10_000, 100_000):
        baseline_rooms: dict[int, KVPoll] = {i: W for i in range(live)}
        table = RoomTable(Role.SENDER, staging=True)
        populate(table, live)
        results[f"dict_us_{live}"] = (
            per_op(lambda i, d=baseline_rooms: dict_lifecycle(d, i), args.n, args.rounds) * 1e6
        )
        results[f"kvroom_us_{live}"] = (
            per_op(lambda i, t=table: kvroom_lifecycle(t, i), args.n, args.rounds) * 1e6
        )
        results[f"failed_us_{live}"] = (
            per_op(lambda i, t=table: kvroom_failure(t, i), args.n, args.rounds) * 1e6
        )
    out = {
        # the worst of the three live-room counts (an empty dict is slower, flattering 0 live)
        "ratio_vs_dict": max(
            results[f"kvroom_us_{n}"] / results[f"dict_us_{n}"] for n in (0, 10_000, 100_000)
        ),
        "ratio_100k_vs_0": results["kvroom_us_100000"] / results["kvroom_us_0"],
        "bytes_per_room": bytes_per_room(),
        **results,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{'live rooms':>12}{'dict us':>10}{'kvroom us':>12}{'ratio':>8}{'failed+cleanup us':>20}")
    for live in (0, 10_000, 100_000):
        d, k, f = (results[f"{p}_us_{live}"] for p in ("dict", "kvroom", "failed"))
        print(f"{live:>12}{d:>10.2f}{k:>12.2f}{k / d:>8.1f}{f:>20.2f}")
    print(f"ratio to dict baseline (worst):  {out['ratio_vs_dict']:.1f}  (target <= 20)")
    print(f"100k live / 0 live:              {out['ratio_100k_vs_0']:.2f}  (target <= 1.2)")
    print(f"bytes per live room:             {out['bytes_per_room']:.0f}  (target <= 1024)")


if __name__ == "__main__":
    main()
