"""Start, drive, fault and reap prefill/decode node processes.

Used by ``kvroom demo``, the end-to-end tests and the soak.  Children are
started with the ``spawn`` method (never ``fork`` a process holding NIXL
threads), die with their parent (``PR_SET_PDEATHSIG``), and are killed by
:meth:`Cluster.close` whatever happened.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import wait
from typing import Any

from kvroom.demo.nodes import NodeOptions, RoomResult, decode_main, prefill_main
from kvroom.demo.workload import RoomSpec

__all__ = ["Cluster", "Node", "NodeError"]


class NodeError(RuntimeError):
    """A node process failed to start or reported an error."""


class Node:
    """One child process and its pipe."""

    def __init__(self, role: str, opts: NodeOptions) -> None:
        ctx = mp.get_context("spawn")
        self.role = role
        self.name = opts.name
        self.opts = opts
        self.conn, child = ctx.Pipe()
        target = prefill_main if role == "prefill" else decode_main
        self.proc = ctx.Process(target=target, args=(child, opts), name=opts.name, daemon=True)
        self.proc.start()
        child.close()
        self.info: dict[str, Any] = {}
        self.final: dict[str, Any] | None = None
        self.errors: list[str] = []
        self.stopped = False
        self.metrics: list[Any] | None = None  # latest metric families it sent
        self.raw: dict[str, Any] | None = None  # latest reply of the raw NIXL phase

    @property
    def pid(self) -> int:
        """The process id."""
        assert self.proc.pid is not None
        return self.proc.pid

    def send(self, kind: str, arg: Any = None) -> None:
        """Send a command; a dead node is ignored."""
        with contextlib.suppress(OSError):  # a dead node is ignored
            self.conn.send((kind, arg))

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.is_alive()


class Cluster:
    """One prefill node and any number of decode nodes on this machine."""

    def __init__(self, base: NodeOptions, *, start_timeout: float = 60.0) -> None:
        self.base = base
        self.start_timeout = start_timeout
        self.nodes: list[Node] = []
        self.results: list[RoomResult] = []
        self.prefill: Node | None = None
        self.decodes: dict[int, Node] = {}
        self.events: list[tuple[float, str]] = []

    # -- lifecycle ------------------------------------------------------------

    def _start(self, role: str, opts: NodeOptions) -> Node:
        node = Node(role, opts)
        self.nodes.append(node)
        deadline = time.monotonic() + self.start_timeout
        while not node.info:
            if time.monotonic() > deadline:
                raise NodeError(f"{opts.name} did not start within {self.start_timeout:g} s")
            if node.conn.poll(0.05):
                self._handle(node)
                if node.errors:
                    raise NodeError(f"{opts.name} failed to start: {node.errors[-1]}")
            elif not node.alive():
                raise NodeError(f"{opts.name} exited with code {node.proc.exitcode} before it was ready")
        return node

    def start_prefill(self, **overrides: Any) -> Node:
        """Start the prefill node."""
        opts = replace(self.base, name="prefill", **overrides)
        self.prefill = self._start("prefill", opts)
        return self.prefill

    def start_decode(self, index: int, **overrides: Any) -> Node:
        """Start (or restart) decode node ``index``."""
        assert self.prefill is not None, "start the prefill first"
        generation = sum(
            1 for n in self.nodes if n.role == "decode" and n.opts.name.startswith(f"decode{index}")
        )
        name = f"decode{index}" + (f".{generation}" if generation else "")
        opts = replace(self.base, name=name, port=0, bootstrap_addr=self.prefill.info["addr"], **overrides)
        node = self._start("decode", opts)
        self.decodes[index] = node
        return node

    def close(self) -> None:
        """Kill every child that still runs and reap it."""
        for node in self.nodes:
            if node.alive():
                try:
                    os.kill(node.pid, signal.SIGCONT)
                    node.proc.kill()
                except ProcessLookupError:
                    pass
        for node in self.nodes:
            node.proc.join(5)
            node.conn.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- driving --------------------------------------------------------------

    def submit(self, rooms: list[RoomSpec]) -> None:
        """Give each room to the prefill and to its decode node."""
        self.submit_prefill(rooms)
        self.submit_decodes(rooms)

    def submit_prefill(self, rooms: list[RoomSpec]) -> None:
        """Give rooms to the prefill only (it may prepare their pages ahead)."""
        assert self.prefill is not None
        self.prefill.send("rooms", rooms)

    def submit_decodes(self, rooms: list[RoomSpec]) -> None:
        """Give each room to its decode node."""
        by_decode: dict[int, list[RoomSpec]] = {}
        for spec in rooms:
            by_decode.setdefault(spec.decode, []).append(spec)
        for index, specs in by_decode.items():
            self.decodes[index].send("rooms", specs)

    def kill(self, node: Node) -> float:
        """SIGKILL a node; returns the time of the kill."""
        node.proc.kill()
        now = time.monotonic()
        self.events.append((now, f"kill {node.name}"))
        node.proc.join(5)
        return now

    def pause(self, node: Node) -> float:
        """SIGSTOP a node."""
        os.kill(node.pid, signal.SIGSTOP)
        node.stopped = True
        now = time.monotonic()
        self.events.append((now, f"stop {node.name}"))
        return now

    def resume(self, node: Node) -> None:
        """SIGCONT a stopped node."""
        os.kill(node.pid, signal.SIGCONT)
        node.stopped = False
        self.events.append((time.monotonic(), f"resume {node.name}"))

    def pump(self, timeout: float = 0.05) -> None:
        """Collect whatever the nodes reported."""
        conns = [n.conn for n in self.nodes if not n.conn.closed]
        for conn in wait(conns, timeout):
            node = next(n for n in self.nodes if n.conn is conn)
            self._handle(node)

    def _handle(self, node: Node) -> None:
        while True:
            try:
                if not node.conn.poll(0):
                    return
                kind, arg = node.conn.recv()
            except (EOFError, OSError):
                node.conn.close()
                return
            if kind == "ready":
                node.info = arg
            elif kind == "done":
                self.results.append(arg)
            elif kind == "final":
                node.final = arg
            elif kind == "error":
                node.errors.append(arg)
            elif kind == "metrics":
                node.metrics = arg
            elif kind == "raw":
                node.raw = arg

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Pump until ``predicate()`` holds or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            self.pump(0.05)
        return True

    def finish(self, timeout: float = 30.0) -> None:
        """Ask every live node to stop and wait for its final report."""
        live = [n for n in self.nodes if n.alive() and not n.conn.closed]
        for node in live:
            node.send("stop")
        self.wait_until(lambda: all(n.final is not None or not n.alive() for n in live), timeout)

    # -- results --------------------------------------------------------------

    def outcome(self, role: str) -> dict[int, RoomResult]:
        """The latest result per room for one role."""
        return {r.room: r for r in self.results if r.role == role}
