"""NIXL agents for the benchmarks' raw WRITEs (UCX, DRAM, no progress thread): two in this
process, or a target in another process that polls for its notifications."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def _agent(name: str) -> Any:
    from nixl._api import nixl_agent, nixl_agent_config

    return nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))


def local_pair(nbytes: int, prefix: str) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    """Agents ``{prefix}-a`` and ``{prefix}-b``, a's ``nbytes`` of ones and b's of zeros registered,
    b known to a: ``a.initialize_xfer("WRITE", ..., f"{prefix}-b")`` writes a's bytes into b's."""
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)
    a, b = _agent(f"{prefix}-a"), _agent(f"{prefix}-b")
    a.register_memory(src)
    b.register_memory(dst)
    a.add_remote_agent(b.get_agent_metadata())
    return a, b, src, dst


def _target(conn: Any, nbytes: int, tick: float) -> None:
    """A NIXL agent in its own process that polls for notifications every ``tick`` seconds (0:
    spins) and answers each with the monotonic time it saw it, until told to stop."""
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    b = _agent("polled-b")
    b.register_memory(dst)
    conn.send((b.get_agent_metadata(), b.get_serialized_descs(b.get_xfer_descs(dst))))
    while not conn.poll():
        if b.get_new_notifs():
            conn.send(time.monotonic())
        if tick:
            time.sleep(tick)
    b.deregister_memory(b.get_reg_descs(dst))


def polled_write_ms(nbytes: int, tick: float, repeat: int = 100) -> float:
    """p50 from posting one WRITE of ``nbytes`` to a target in another process seeing its
    notification, that target polling NIXL every ``tick`` seconds (what a worker that cannot
    spin a core sees of a WRITE)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_target, args=(there, nbytes, tick), daemon=True)
    proc.start()
    try:
        metadata, descs = here.recv()
        src = torch.ones(nbytes, dtype=torch.uint8)
        a = _agent("polled-a")
        a.register_memory(src)
        peer = a.add_remote_agent(metadata)
        local, remote = a.get_xfer_descs(src), a.deserialize_descs(descs)
        times = []
        for _ in range(repeat):
            start = time.monotonic()
            handle = a.initialize_xfer("WRITE", local, remote, peer, b"x")
            state = a.transfer(handle)
            while state != "DONE":
                state = a.check_xfer_state(handle)
            seen = here.recv()
            a.release_xfer_handle(handle)
            times.append(seen - start)
        return 1000 * statistics.median(times)
    finally:
        here.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.kill()
