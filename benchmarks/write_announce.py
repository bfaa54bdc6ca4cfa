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
from typing import Any

from _agents import remote_write_ms

SIZES = (4096, 512 << 10, 4 << 20)
TICKS = (0.0, 0.0002, 0.001)


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
                port = args.port if mode == "zmq" else None
                # the first WRITEs set up the connection; the target is then anywhere in its tick
                done, seen = remote_write_ms(nbytes, tick or 0.0, args.repeat, port=port, warmup=5, gap=0.003)
                tick_ms = None if tick is None else 1000 * tick
                row = {"bytes": nbytes, "mode": mode, "tick_ms": tick_ms}
                rows.append({**row, "done_ms": done, "seen_ms": seen})
    if args.json:
        print(json.dumps({"rows": rows}))
        return
    print(f"{'bytes':>8} {'mode':>6} {'tick ms':>8} {'DONE ms':>8} {'seen ms':>8}")
    for r in rows:
        tick = "wait" if r["tick_ms"] is None else f"{r['tick_ms']:g}"
        print(f"{r['bytes']:>8} {r['mode']:>6} {tick:>8} {r['done_ms']:>8.3f} {r['seen_ms']:>8.3f}")


if __name__ == "__main__":
    main()
