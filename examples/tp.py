"""Tensor parallelism: prefill TP 2 hands one room to decode TP 1, every rank its own process.

    python examples/tp.py

Each prefill rank holds half of the model's KV heads; the decode rank holds
all of them, so prefill's head slices interleave inside decode's pages and
kvroom stages them (decode's pool has a staging ring).  The decode receiver
names every prefill rank's bootstrap address, in rank order; each sender
waits for the page list of every decode rank.  Exit status 0 when the room
succeeded on every rank and decode holds every head's bytes.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from multiprocessing.queues import Queue
from typing import Any

import torch

from kvroom import KVManager, KVPoll, KVPool, KVReceiver, KVSender

HEADS, LAYERS, PAGE_SIZE, HEAD_DIM = 4, 2, 16, 64  # the model's KV geometry
ROOM, PAGES, PREFILL_TP = 7, 8, 2


def make_pool(rank: int, size: int, staging_pages: int = 0) -> KVPool:
    """One rank's pool: per layer ``[pages, PAGE_SIZE, its KV heads, HEAD_DIM]``."""
    heads = HEADS // size
    layers = [torch.zeros(64, PAGE_SIZE, heads, HEAD_DIM, dtype=torch.float16) for _ in range(LAYERS)]
    aux = torch.zeros(8, 64, dtype=torch.uint8)
    return KVPool(
        layers,
        aux,
        page_size=PAGE_SIZE,
        kv_heads=heads,
        tp_rank=rank,
        tp_size=size,
        staging_pages=staging_pages,
    )


def wait(handle: KVSender | KVReceiver, *states: KVPoll) -> KVPoll:
    """Poll one room until it reaches one of ``states``."""
    while (state := handle.poll()) not in states:
        time.sleep(0.001)
    return state


def prefill_rank(rank: int, addresses: Queue[Any], outcomes: Queue[Any]) -> None:
    """Prefill rank ``rank`` of ``PREFILL_TP``: its heads of the request's KV."""
    pool = make_pool(rank, PREFILL_TP)
    for layer in pool.layers:  # global head h of every token holds h + 1
        for local in range(layer.shape[2]):
            layer[:PAGES, :, local] = rank * layer.shape[2] + local + 1
    with KVManager("prefill", pool, audit=False) as prefill:
        addresses.put((rank, prefill.bootstrap_addr))
        sender = KVSender(prefill, None, ROOM)  # None: bound to whichever decode ranks ask for the room
        if wait(sender, KVPoll.WaitingForInput, KVPoll.Failed) == KVPoll.WaitingForInput:
            sender.init(PAGES)
            sender.send(torch.arange(PAGES))
        state = wait(sender, KVPoll.Success, KVPoll.Failed)
        if state == KVPoll.Success:
            sender.clear()
        outcomes.put((f"prefill rank {rank}", state.name, True))


def decode_rank(addresses: list[str], outcomes: Queue[Any]) -> None:
    """The decode rank (TP 1): receives every head from both prefill ranks."""
    pool = make_pool(0, 1, staging_pages=64)
    pages = torch.arange(PAGES) + 20
    with KVManager("decode", pool, audit=False) as decode:
        receiver = KVReceiver(decode, addresses, ROOM)  # one address per prefill rank, in rank order
        receiver.init()
        receiver.send_metadata(pages)
        state = wait(receiver, KVPoll.Success, KVPoll.Failed)
        expected = torch.arange(1, HEADS + 1, dtype=torch.float16).view(1, 1, HEADS, 1)
        ok = all(bool((layer[pages] == expected).all()) for layer in pool.layers)
        if state == KVPoll.Success:
            receiver.clear()
        outcomes.put(("decode rank 0", state.name, ok))


def main() -> int:
    """Start the three rank processes; returns 0 when the room succeeded everywhere."""
    ctx = mp.get_context("spawn")  # never fork a process that holds NIXL threads
    addresses: Queue[Any] = ctx.Queue()
    outcomes: Queue[Any] = ctx.Queue()
    ranks = [ctx.Process(target=prefill_rank, args=(r, addresses, outcomes)) for r in range(PREFILL_TP)]
    for proc in ranks:
        proc.start()
    try:
        addrs = [addr for _, addr in sorted(addresses.get(timeout=60) for _ in range(PREFILL_TP))]
        ranks.append(ctx.Process(target=decode_rank, args=(addrs, outcomes)))
        ranks[-1].start()
        results = [outcomes.get(timeout=60) for _ in ranks]
    finally:
        for proc in ranks:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    for name, state, ok in sorted(results):
        print(f"{name}: {state}" + ("" if ok else " (WRONG BYTES)"))
    return 0 if all(state == "Success" and ok for _, state, ok in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
