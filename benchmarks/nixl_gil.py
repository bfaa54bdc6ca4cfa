"""Does NIXL's Python binding keep the GIL while it copies? What does a busy Python thread cost it?

Two NIXL agents in this process (UCX, DRAM, no progress thread), one registered CPU tensor each.
For each call it times how many it completes per second alone and beside one thread that runs
pure Python without pause (an engine's scheduler loop at its busiest):

* ``transfer()`` of one large WRITE, with a spinning thread beside it: the thread's progress
  during the call says whether the GIL was held (no progress) or released (progress);
* small WRITEs posted to DONE, ``check_xfer_state`` and ``get_new_notifs`` in a loop: a call that
  releases the GIL must win it back from the busy thread, which CPython hands over only every
  ``sys.getswitchinterval()`` (5 ms by default), so each such call can wait up to that long.

``--switch S`` sets the interpreter's switch interval first (seconds), to show the wait follow it.

    python benchmarks/nixl_gil.py [--mib 1] [--big-mib 512] [--seconds 0.5] [--switch S] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any


class _Spinner:
    """A thread that counts as fast as pure Python can, until stopped."""

    def __init__(self) -> None:
        self.count = 0
        self._stop = False
        self._thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        while not self._stop:
            self.count += 1

    def __enter__(self) -> _Spinner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()


def _rate(fn: Callable[[], object], seconds: float) -> float:
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        fn()
        n += 1
    return n / seconds


def main(argv: list[str] | None = None) -> int:
    """Print the figures (``--json``: one object)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=float, default=1.0, help="size of the small WRITEs (MiB)")
    parser.add_argument("--big-mib", type=int, default=512, help="size of the large WRITE (MiB)")
    parser.add_argument("--seconds", type=float, default=0.5, help="time per rate measurement")
    parser.add_argument("--switch", type=float, default=None, help="sys.setswitchinterval first")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.switch is not None:
        sys.setswitchinterval(args.switch)
    from _agents import local_pair

    big = args.big_mib << 20
    a, b, src, dst = local_pair(big, "gil")

    def post(nbytes: int) -> tuple[Any, float]:
        handle = a.initialize_xfer(
            "WRITE", a.get_xfer_descs(src[:nbytes]), b.get_xfer_descs(dst[:nbytes]), "gil-b"
        )
        start = time.perf_counter()
        a.transfer(handle)
        return handle, time.perf_counter() - start

    def wait(handle: Any) -> None:
        while a.check_xfer_state(handle) != "DONE":
            b.get_new_notifs()

    def finish(handle: Any) -> None:
        wait(handle)
        a.release_xfer_handle(handle)

    # 1. the large WRITE: does the thread beside it run while transfer() copies?
    finish(post(big)[0])  # warm-up
    with _Spinner() as spinner:
        time.sleep(0.05)
        before = spinner.count
        handle, posted = post(big)
        during = spinner.count - before
    finish(handle)
    with _Spinner() as spinner:
        time.sleep(0.05)
        before, t0 = spinner.count, time.perf_counter()
        time.sleep(posted)
        alone_pace = (spinner.count - before) / (time.perf_counter() - t0)

    # 2. calls per second alone and beside the busy thread
    small = int(args.mib * (1 << 20))
    finish(post(small)[0])  # warm-up
    done, _ = post(small)  # a DONE handle for check_xfer_state to query
    wait(done)
    calls: dict[str, Callable[[], object]] = {
        f"WRITE {args.mib:g} MiB to DONE": lambda: finish(post(small)[0]),
        "check_xfer_state": lambda: a.check_xfer_state(done),
        "get_new_notifs": b.get_new_notifs,
        "pure Python call": lambda: None,
    }
    rates = {}
    for name, fn in calls.items():
        alone = _rate(fn, args.seconds)
        with _Spinner():
            beside = _rate(fn, args.seconds)
        rates[name] = {"alone_per_s": round(alone), "beside_busy_thread_per_s": round(beside)}
    a.release_xfer_handle(done)
    out = {
        "switch_interval_s": sys.getswitchinterval(),
        "big_write_mib": args.big_mib,
        "big_transfer_call_ms": round(1000 * posted, 2),
        "spinner_pace_during_transfer": round(during / posted) if posted else None,
        "spinner_pace_alone": round(alone_pace),
        "gil_released_during_copy": bool(during > 0.1 * alone_pace * posted),
        "rates": rates,
    }
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"switch interval {out['switch_interval_s'] * 1000:g} ms")
    print(
        f"transfer() of one {args.big_mib} MiB WRITE took {out['big_transfer_call_ms']} ms; a pure-Python "
        f"thread beside it ran {out['spinner_pace_during_transfer']:,}/s against "
        f"{out['spinner_pace_alone']:,}/s "
        f"alone: the GIL was {'released' if out['gil_released_during_copy'] else 'held'} during the copy"
    )
    print(f"{'call':26} {'alone /s':>12} {'beside a busy thread /s':>24} {'slowdown':>9}")
    for name, r in rates.items():
        slow = r["alone_per_s"] / max(1, r["beside_busy_thread_per_s"])
        print(f"{name:26} {r['alone_per_s']:>12,} {r['beside_busy_thread_per_s']:>24,} {slow:>8.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
