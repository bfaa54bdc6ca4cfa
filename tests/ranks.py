"""Tensor-parallel ranks as real processes, driven one call at a time.

Each rank is a spawned process with its own manager and NIXL agent; the test
calls methods of :class:`RankServer` in it over a pipe (``Rank.call``).  A
process can host several managers in turn (``start``/``stop``), so the (m, n)
sweep pays the process start-up once.  Children die with their parent.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

HEADS, LAYERS, PAGE_SIZE, HEAD_DIM, PAGES, AUX_SLOTS = 4, 2, 2, 8, 64, 8
SRC_AUX = 2  # the prefill aux slot the tests send (it holds SRC_AUX + 1)


def make_pool(rank: int, size: int, staging_pages: int = 0) -> Any:
    """A rank's pool: int32 pages [PAGES, PAGE_SIZE, HEADS/size, HEAD_DIM] per layer."""
    from kvroom import KVPool

    kv = HEADS // size
    layers = [torch.zeros(PAGES, PAGE_SIZE, kv, HEAD_DIM, dtype=torch.int32) for _ in range(LAYERS)]
    aux = torch.zeros(AUX_SLOTS, 8, dtype=torch.uint8)
    return KVPool(
        layers, aux, page_size=PAGE_SIZE, kv_heads=kv, tp_rank=rank, tp_size=size, staging_pages=staging_pages
    )


def pattern(layer: int, pages: Sequence[int] | np.ndarray, heads: Sequence[int]) -> torch.Tensor:
    """What prefill holds at (layer, page, token, global head, dim): unique per element."""
    p = torch.as_tensor(np.asarray(pages)).view(-1, 1, 1, 1)
    t = torch.arange(PAGE_SIZE).view(1, -1, 1, 1)
    h = torch.as_tensor(list(heads)).view(1, 1, -1, 1)
    d = torch.arange(HEAD_DIM).view(1, 1, 1, -1)
    return (layer * 1_000_000 + p * 1000 + t * 100 + h * 10 + d).to(torch.int32)


def fill(pool: Any) -> None:
    """Write the pattern into every page of a prefill pool, and aux slot i = i + 1."""
    heads = list(range(*pool.layout.heads))
    for layer, tensor in enumerate(pool.layers):
        tensor.copy_(pattern(layer, range(pool.num_pages), heads))
    for slot in range(pool.aux_slots):
        pool.aux[slot] = slot + 1


def holds(pool: Any, dst: Sequence[int], src: Sequence[int]) -> bool:
    """True when decode pages ``dst`` hold prefill pages ``src`` for this rank's heads."""
    heads = list(range(*pool.layout.heads))
    index = torch.as_tensor(np.asarray(dst))
    return all(
        torch.equal(pool.page_view(layer)[index], pattern(layer, src, heads)) for layer in range(LAYERS)
    )


class RankServer:
    """What runs in a rank process: one manager at a time, its rooms by id."""

    def __init__(self) -> None:
        self.manager: Any = None
        self.rooms: dict[int, Any] = {}

    def start(self, role: str, rank: int, size: int, staging_pages: int = 0, **config: Any) -> str:
        from kvroom import KVManager, ManagerConfig
        from kvroom.fsm import Deadlines

        self.stop()
        deadlines = Deadlines(*config.pop("deadlines", (10.0, 20.0, 10.0)))
        cfg = ManagerConfig(deadlines=deadlines, **config)
        pool = make_pool(rank, size, staging_pages)
        if role == "prefill":
            fill(pool)
        self.manager = KVManager(role, pool, config=cfg, audit=False)
        return str(self.manager.bootstrap_addr)

    def stop(self) -> None:
        if self.manager is not None:
            self.manager.close()
        self.manager, self.rooms = None, {}

    def sender(self, room: int) -> None:
        from kvroom import KVSender

        self.rooms[room] = KVSender(self.manager, None, room)

    def receiver(
        self, room: int, addrs: list[str], dst: list[int], aux: int | None = None, prefix: int = 0
    ) -> None:
        from kvroom import KVReceiver

        rx = KVReceiver(self.manager, addrs, room)
        rx.init()
        rx.send_metadata(dst, aux_index=aux, decode_prefix_len=prefix * PAGE_SIZE)
        self.rooms[room] = rx

    def init(self, room: int, npages: int, aux: int | None = None) -> None:
        self.rooms[room].init(npages, aux_index=aux)

    def send(self, room: int, pages: list[int]) -> None:
        self.rooms[room].send(pages)

    def abort(self, room: int) -> None:
        self.rooms[room].abort()

    def poll(self, room: int) -> str:
        return str(self.rooms[room].poll().name)

    def wait(self, rooms: list[int], states: list[str], timeout: float) -> dict[int, str]:
        """Wait until every room is in one of ``states``; returns each room's state."""
        end = time.monotonic() + timeout
        while True:
            got = {r: self.poll(r) for r in rooms}
            if all(s in states for s in got.values()) or time.monotonic() > end:
                return got
            time.sleep(0.005)

    def failure(self, room: int) -> str:
        try:
            self.rooms[room].failure_exception()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return ""

    def footprint(self, room: int) -> list[str]:
        return sorted(self.manager.footprint(room))

    def clear(self, room: int) -> None:
        self.rooms[room].clear()

    def holds(self, dst: list[int], src: list[int]) -> bool:
        return holds(self.manager.pool, dst, src)

    def aux(self, slot: int) -> int:
        return int(self.manager.pool.aux[slot][0])

    def prefetch(self, room: int, addrs: list[str], npages: int) -> bool:
        return bool(self.manager.prefetch_staging(room, addrs, npages))

    def debug(self, room: int) -> str:
        r = self.rooms[room].room
        plan = getattr(self.manager.side, "plans", None)
        extra = ""
        if plan is not None and plan.get(room) is not None:
            extra = str({a: (s.finished, sorted(s.seen)) for a, s in plan.get(room).sources.items()})
        return f"{r.state.name} chunks {r.chunks_done}/{r.chunks_needed} aux {r.aux_done} {extra}"

    def snapshot(self) -> dict[str, Any]:
        return dict(self.manager.snapshot())


def _serve(conn: Connection, factory: Callable[[], Any] = RankServer) -> None:
    """A rank process: build ``factory()`` and run the methods the test sends, one at a time."""
    from kvroom.demo.nodes import die_with_parent

    die_with_parent()
    server = factory()
    while True:
        try:
            method, args, kwargs = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", getattr(server, method)(*args, **kwargs)))
        except Exception as exc:
            conn.send(("err", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


class Rank:
    """The test's end of one rank process."""

    def __init__(
        self, name: str, env: dict[str, str] | None = None, server: Callable[[], Any] = RankServer
    ) -> None:
        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            self.proc = ctx.Process(target=_serve, args=(child, server), name=name, daemon=True)
            self.proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()

    def call(self, method: str, *args: Any, timeout: float = 60.0, **kwargs: Any) -> Any:
        """Run ``method`` in the process; raises RuntimeError with its traceback on error."""
        self.post(method, *args, **kwargs)
        return self.result(method, timeout)

    def post(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Send a call without waiting (for collectives across ranks); :meth:`result` answers it."""
        self.conn.send((method, args, kwargs))

    def result(self, method: str, timeout: float = 60.0) -> Any:
        """The answer to the last posted call."""
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.name}: {method} did not answer in {timeout} s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"{self.name}.{method}: {value}")
        return value

    def kill(self) -> None:
        """SIGKILL the process and reap it."""
        if self.proc.is_alive():
            os.kill(self.proc.pid or 0, signal.SIGCONT)
            self.proc.kill()
        self.proc.join(10)

    def pause(self) -> float:
        """SIGSTOP the process; returns when it was stopped (monotonic)."""
        os.kill(self.proc.pid or 0, signal.SIGSTOP)
        return time.monotonic()

    def resume(self) -> None:
        """SIGCONT the process."""
        os.kill(self.proc.pid or 0, signal.SIGCONT)

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.is_alive()
