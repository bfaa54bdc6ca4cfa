"""A prefill or decode node for the two-host test, run inside a network namespace.

    python -m tests.netns_node prefill HOST ROOMS...      (prints {"addr": ...})
    python -m tests.netns_node decode ADDR ROOMS...       (prints one result per room)

Both authenticate with the CURVE key pairs ``prefill`` and ``decode`` that
``kvroom keys`` wrote into the directory named by ``$KVROOM_TEST_KEYS`` (each
trusts only the other's public key).

Prefill serves the listed rooms; it sends a room's pages only once a line
``go N`` for it arrives on stdin (so the test controls "mid-transfer"), reports
every room's end as a JSON line, and exits when stdin closes.  Decode receives
the listed rooms, checks every byte, reports each room, then idles until it is
killed or stdin closes.  Lines on stdout are JSON; logs go to stderr.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from typing import Any

import numpy as np
import torch

PAGES, PAGE_BYTES = 8, 32 << 10


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def pool() -> Any:
    from kvroom import KVPool

    return KVPool(
        [torch.zeros(64 * PAGES, PAGE_BYTES, dtype=torch.uint8)], torch.zeros(4, 8, dtype=torch.uint8)
    )


def src_pages(room: int) -> np.ndarray:
    return np.arange(PAGES) + (room % 64) * PAGES


def pattern(room: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(room)
    return torch.randint(0, 255, (PAGES, PAGE_BYTES), dtype=torch.uint8, generator=g)


def config(role: str, host: str = "127.0.0.1") -> Any:
    import os
    from pathlib import Path

    from kvroom import CurveKeys, ManagerConfig
    from kvroom.fsm import Deadlines

    keys_dir = Path(os.environ["KVROOM_TEST_KEYS"])
    other = "decode" if role == "prefill" else "prefill"
    keys = CurveKeys.load(keys_dir / f"{role}.key_secret", [keys_dir / f"{other}.key"])
    deadlines = Deadlines(60.0, 60.0, 10.0)
    return ManagerConfig(
        heartbeat_interval=0.2, heartbeat_timeout=2.0, deadlines=deadlines, host=host, keys=keys
    )


def stderr_logger() -> Any:
    """Logs and audit events to stderr: stdout carries only our JSON lines."""
    import structlog

    return structlog.wrap_logger(structlog.PrintLogger(sys.stderr))


_INBOX: queue.SimpleQueue[str | None] = queue.SimpleQueue()


def _read_stdin() -> None:
    for line in sys.stdin:
        _INBOX.put(line.strip())
    _INBOX.put(None)


threading.Thread(target=_read_stdin, daemon=True).start()


def lines() -> list[str]:
    """Lines that arrived on stdin (non-blocking); raises EOFError once it closed."""
    out = []
    while not _INBOX.empty():
        line = _INBOX.get()
        if line is None:
            raise EOFError
        out.append(line)
    return out


def prefill(host: str, rooms: list[int]) -> None:
    from kvroom import KVManager, KVPoll, KVSender

    manager = KVManager("prefill", pool(), config=config("prefill", host), logger=stderr_logger())
    for room in rooms:
        manager.pool.layers[0][src_pages(room)] = pattern(room)
    say(addr=manager.bootstrap_addr)
    senders = {room: KVSender(manager, None, room) for room in rooms}
    go: set[int] = set()
    open_rooms = set(rooms)
    try:
        while True:
            try:
                for line in lines():
                    go.add(int(line.split()[1]))
            except EOFError:
                break
            for room in sorted(open_rooms):
                tx = senders[room]
                state = tx.poll()
                if state is KVPoll.WaitingForInput and room in go:
                    tx.init(PAGES)
                    tx.send(src_pages(room))
                if state in (KVPoll.Success, KVPoll.Failed):
                    error = ""
                    if state is KVPoll.Failed:
                        try:
                            tx.failure_exception()
                        except Exception as exc:
                            error = f"{type(exc).__name__}: {exc}"
                    else:
                        tx.clear()
                    open_rooms.discard(room)
                    say(room=room, state=state.name, error=error, footprint=sorted(manager.footprint(room)))
            time.sleep(0.005)
    finally:
        say(closing=True, live=len(manager.table))
        manager.close()


def decode(addr: str, rooms: list[int]) -> None:
    from kvroom import KVManager, KVPoll, KVReceiver

    manager = KVManager("decode", pool(), config=config("decode"), logger=stderr_logger())
    receivers = {}
    for i, room in enumerate(rooms):
        rx = KVReceiver(manager, addr, room)
        rx.init()
        rx.send_metadata(np.arange(PAGES) + i * PAGES)
        receivers[room] = (rx, np.arange(PAGES) + i * PAGES)
    say(ready=True)
    while receivers:
        for room, (rx, pages) in list(receivers.items()):
            state = rx.poll()
            if state in (KVPoll.Success, KVPoll.Failed):
                ok = state is KVPoll.Success and torch.equal(manager.pool.layers[0][pages], pattern(room))
                error = ""
                if state is KVPoll.Success:
                    rx.clear()
                else:
                    try:
                        rx.failure_exception()
                    except Exception as exc:
                        error = f"{type(exc).__name__}: {exc}"
                del receivers[room]
                footprint = sorted(manager.footprint(room))
                say(room=room, state=state.name, verified=ok, error=error, footprint=footprint)
        time.sleep(0.005)
    try:
        while True:
            lines()
            time.sleep(0.05)
    except EOFError:
        manager.close()


if __name__ == "__main__":
    role, where, *ids = sys.argv[1:]
    (prefill if role == "prefill" else decode)(where, [int(r) for r in ids])
