"""The smallest prefill: serve one request's KV pages to a decode process.

    python examples/prefill.py                  # prints its bootstrap address, then waits
    python examples/decode.py 127.0.0.1:PORT    # in another shell

Both sides agree on the room id (in a real deployment the router hands it to
both).  Exit status 0 when the room succeeded.
"""

from __future__ import annotations

import time

import torch

from kvroom import KVManager, KVPoll, KVPool, KVSender

ROOM, PAGES = 42, 4


def wait(handle: KVSender, *states: KVPoll) -> KVPoll:
    """A scheduler polls its rooms once per step; here, one room until it reaches ``states``."""
    while (state := handle.poll()) not in states:
        time.sleep(0.001)
    return state


def main() -> int:
    """Serve room ``ROOM``; returns the exit status."""
    layers = [torch.zeros(64, 4096, dtype=torch.uint8) for _ in range(2)]  # 2 layers of 64 pages
    pool = KVPool(layers, torch.zeros(8, 64, dtype=torch.uint8))  # and 8 aux slots
    for index, layer in enumerate(pool.layers):
        layer[:PAGES] = index + 1  # the KV this request's forward pass computed
    pool.aux[0] = 9
    with KVManager("prefill", pool, bootstrap_port=0) as prefill:
        print(prefill.bootstrap_addr, flush=True)  # decode connects here
        # --8<-- [start:prefill]
        sender = KVSender(prefill, prefill.bootstrap_addr, ROOM)  # Bootstrapping until decode's page list
        if wait(sender, KVPoll.WaitingForInput, KVPoll.Failed) == KVPoll.WaitingForInput:
            sender.init(PAGES, aux_index=0)
            sender.send(torch.arange(PAGES))  # once per chunk; the last one completes PAGES
        if wait(sender, KVPoll.Success, KVPoll.Failed) == KVPoll.Failed:
            try:
                sender.failure_exception()  # raises the cause: PeerLostError, DeadlineExceededError, ...
            except Exception as exc:
                print(f"room {ROOM} failed: {exc}")
                return 1
        sender.clear()  # after Success; a Failed room is already clean
        # --8<-- [end:prefill]
        print(f"room {ROOM}: sent {PAGES} pages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
