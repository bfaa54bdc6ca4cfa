"""The smallest decode: receive one request's KV pages from ``examples/prefill.py``.

    python examples/decode.py 127.0.0.1:PORT

Exit status 0 when the room succeeded and every byte arrived.
"""

from __future__ import annotations

import sys
import time

import torch

from kvroom import KVManager, KVPoll, KVPool, KVReceiver, TransportError

ROOM, PAGES = 42, 4


def wait(handle: KVReceiver, *states: KVPoll) -> KVPoll:
    """A scheduler polls its rooms once per step; here, one room until it reaches ``states``."""
    while (state := handle.poll()) not in states:
        time.sleep(0.001)
    return state


def main(bootstrap_addr: str) -> int:
    """Receive room ``ROOM`` from the prefill at ``bootstrap_addr``; returns the exit status."""
    layers = [torch.zeros(64, 4096, dtype=torch.uint8) for _ in range(2)]  # the same layout as prefill
    pool = KVPool(layers, torch.zeros(8, 64, dtype=torch.uint8))
    pages = torch.arange(PAGES) + 10  # where this request's KV goes in our pool
    with KVManager("decode", pool) as decode:
        # --8<-- [start:decode]
        receiver = KVReceiver(decode, bootstrap_addr, ROOM)
        receiver.init()  # handshake with that prefill
        receiver.send_metadata(pages, aux_index=1, decode_prefix_len=0)
        state = wait(receiver, KVPoll.Success, KVPoll.Failed)  # Failed only once no WRITE can still land
        if state == KVPoll.Failed:
            try:
                receiver.failure_exception()
            except TransportError as exc:  # PeerLostError, DeadlineExceededError, RemoteFailureError, ...
                print(f"room {ROOM} failed: {exc}")  # its pages are reusable at once
                return 1
        receiver.clear()  # after Success; a Failed room is already clean; the handle is spent
        # --8<-- [end:decode]
        ok = all(bool((layer[pages] == i + 1).all()) for i, layer in enumerate(pool.layers))
        ok = ok and bool((pool.aux[1] == 9).all())
        print(f"room {ROOM}: received {PAGES} pages, {'verified' if ok else 'WRONG BYTES'}")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/decode.py BOOTSTRAP_ADDR  (printed by examples/prefill.py)")
    raise SystemExit(main(sys.argv[1]))
