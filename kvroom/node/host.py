"""What the node machinery uses of its manager: a narrow, typed view.

:class:`~kvroom.node.prefill.PrefillSide`, :class:`~kvroom.node.decode.DecodeSide`
and their helpers are built by the manager and hold it as a :class:`NodeHost`:
the room table, the NIXL agent, the ZMQ context, the config, the clock, the
logger, the worker's stall watch and command queue.  They never import
:mod:`kvroom.manager` (the API sits above them; see ``[tool.importlinter]``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

import zmq

from kvroom.config import ManagerConfig
from kvroom.fsm import Event, RoomTable
from kvroom.fsm.room import Room
from kvroom.planning import RankRegions
from kvroom.transport.layout import KVPool
from kvroom.transport.nixl import NixlAgent

__all__ = ["NodeHost", "StallWatch"]


class StallWatch:
    """Measures the worker loop's own pauses (SIGSTOP, a long GC, a starved core).

    The loop ticks every few milliseconds; a gap between two ticks longer than
    ``interval`` is a pause of this process, and the sides must not count it as
    their peers' silence.  ``pause`` is the pause measured at the latest tick
    (0.0 when there was none).
    """

    def __init__(self, interval: float, now: float) -> None:
        self.interval = interval
        self.last = now
        self.pause = 0.0
        self.pauses = 0

    def tick(self, now: float) -> float:
        """Record a loop iteration at ``now``; returns the pause before it (0.0 if none)."""
        gap = now - self.last
        self.last = now
        self.pause = gap if gap > self.interval else 0.0
        if self.pause:
            self.pauses += 1
        return self.pause


class NodeHost(Protocol):
    """The manager as its sides see it (read-only attributes and two calls)."""

    @property
    def config(self) -> ManagerConfig: ...

    @property
    def table(self) -> RoomTable: ...

    @property
    def regions(self) -> RankRegions: ...

    @property
    def tensors(self) -> KVPool | None: ...

    @property
    def agent(self) -> NixlAgent: ...

    @property
    def agent_name(self) -> str: ...

    @property
    def zmq_context(self) -> zmq.Context[Any]: ...

    @property
    def clock(self) -> Callable[[], float]: ...

    @property
    def log(self) -> Any: ...

    @property
    def stall(self) -> StallWatch: ...

    @property
    def worker(self) -> threading.Thread: ...

    def fire(self, room: Room, event: Event, **kw: Any) -> bool:
        """Fire ``event`` at ``room`` at the current time."""
        ...

    def enqueue(self, command: Callable[[], None]) -> None:
        """Queue ``command`` for the worker thread."""
        ...
