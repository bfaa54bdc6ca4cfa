"""NIXL agents for the benchmarks' raw WRITEs (UCX, DRAM, no progress thread): two in this
process, or a target in another process that polls for its notifications or is told over ZMQ."""

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


def _target(conn: Any, nbytes: int, tick: float, port: int | None) -> None:
    """A NIXL agent in its own process that answers each WRITE it sees with the monotonic time it
    saw it, until told to stop: by polling NIXL for notifications every ``tick`` seconds (0:
    spins), or with ``port``, by waiting on a ZMQ socket bound there for the initiator's word
    (one NIXL progress call a turn, as kvroom's decode worker)."""
    import zmq

    dst = torch.zeros(nbytes, dtype=torch.uint8)
    b = _agent("polled-b")
    b.register_memory(dst)
    sock = poller = None
    if port is not None:
        sock = zmq.Context.instance().socket(zmq.PULL)
        sock.bind(f"tcp://127.0.0.1:{port}")
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
    conn.send((b.get_agent_metadata(), b.get_serialized_descs(b.get_xfer_descs(dst))))
    while not conn.poll():
        if sock is None or poller is None:
            if b.get_new_notifs():
                conn.send(time.monotonic())
            if tick:
                time.sleep(tick)
        else:
            b.get_new_notifs()  # progress only
            if poller.poll(5):
                sock.recv()
                conn.send(time.monotonic())
    if sock is not None:
        sock.close(0)
    b.deregister_memory(b.get_reg_descs(dst))


def remote_write_ms(
    nbytes: int, tick: float, repeat: int = 100, *, port: int | None = None, warmup: int = 0, gap: float = 0.0
) -> tuple[float, float]:
    """p50s (ms) from posting one WRITE of ``nbytes`` to its DONE here and to a target in another
    process seeing it (:func:`_target`): the WRITE carries a NIXL notification, or with ``port``
    none, and a ZMQ message goes to the target at DONE.  The first ``warmup`` WRITEs are not
    counted; ``gap`` seconds pass between WRITEs."""
    import multiprocessing

    import zmq

    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_target, args=(there, nbytes, tick, port), daemon=True)
    proc.start()
    push = None
    try:
        metadata, descs = here.recv()
        src = torch.ones(nbytes, dtype=torch.uint8)
        a = _agent("polled-a")
        a.register_memory(src)
        peer = a.add_remote_agent(metadata)
        local, remote = a.get_xfer_descs(src), a.deserialize_descs(descs)
        if port is not None:
            push = zmq.Context.instance().socket(zmq.PUSH)
            push.connect(f"tcp://127.0.0.1:{port}")
        done, seen = [], []
        for i in range(warmup + repeat):
            start = time.monotonic()
            if push is None:
                handle = a.initialize_xfer("WRITE", local, remote, peer, b"x")
            else:
                handle = a.initialize_xfer("WRITE", local, remote, peer)
            state = a.transfer(handle)
            while state != "DONE":
                state = a.check_xfer_state(handle)
            finished = time.monotonic()
            if push is not None:
                push.send(b"written")
            saw = here.recv()
            a.release_xfer_handle(handle)
            if i >= warmup:
                done.append(finished - start)
                seen.append(saw - start)
            if gap:
                time.sleep(gap)
        return 1000 * statistics.median(done), 1000 * statistics.median(seen)
    finally:
        if push is not None:
            push.close(0)
        here.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def polled_write_ms(nbytes: int, tick: float, repeat: int = 100) -> float:
    """p50 from posting one WRITE of ``nbytes`` to a target in another process seeing its
    notification, that target polling NIXL every ``tick`` seconds (what a worker that cannot
    spin a core sees of a WRITE)."""
    return remote_write_ms(nbytes, tick, repeat)[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 free now (another process may still take it before it is bound)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def announced_write_ms(nbytes: int, repeat: int = 100) -> tuple[float, float]:
    """p50s (ms) from posting one WRITE of ``nbytes`` to its DONE, and to a target in another
    process hearing of it in a ZMQ message sent at DONE while it waits on its socket (how
    kvroom's decode learns of one)."""
    return remote_write_ms(nbytes, 0.0, repeat, port=free_port(), warmup=5, gap=0.003)
