"""Deadlines: how long a room may stay in each state, and the heap of armed ones.

Each non-terminal state may have a deadline (:class:`Deadlines`); entering the
state arms one entry in a :class:`DeadlineHeap`.  Entries are never removed
when a room moves on: a popped entry counts only if the room is still live, in
that state, with that deadline (the caller checks), so arming is O(log n) and
leaving a state costs nothing.  Time is always passed in.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from dataclasses import dataclass

from kvroom.fsm.room import Room
from kvroom.fsm.spec import KVPoll

__all__ = ["DeadlineHeap", "Deadlines"]


@dataclass(frozen=True)
class Deadlines:
    """Seconds a room may stay in each non-terminal state (None: no deadline)."""

    bootstrapping: float | None = 30.0
    waiting: float | None = 300.0
    transferring: float | None = 30.0

    def __post_init__(self) -> None:
        for name in ("bootstrapping", "waiting", "transferring"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"deadline {name} must be positive or None, got {value!r}")

    def for_state(self, state: KVPoll) -> float | None:
        """The deadline of ``state`` in seconds, or None."""
        if state is KVPoll.Bootstrapping:
            return self.bootstrapping
        if state is KVPoll.WaitingForInput:
            return self.waiting
        if state is KVPoll.Transferring:
            return self.transferring
        return None


class DeadlineHeap:
    """Armed deadlines, earliest first; thread-safe."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Room, KVPoll]] = []
        self._lock = threading.Lock()
        self._seq = itertools.count()

    def push(self, due: float, room: Room, state: KVPoll) -> None:
        """Arm ``room``'s deadline ``due`` for ``state``."""
        with self._lock:
            heapq.heappush(self._heap, (due, next(self._seq), room, state))

    def earliest(self) -> float | None:
        """The earliest armed deadline (possibly stale), or None."""
        with self._lock:
            return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[tuple[float, Room, KVPoll]]:
        """Remove and return every entry due at or before ``now`` (stale ones included)."""
        due: list[tuple[float, Room, KVPoll]] = []
        with self._lock:
            heap = self._heap
            while heap and heap[0][0] <= now:
                deadline, _, room, state = heapq.heappop(heap)
                due.append((deadline, room, state))
        return due
