"""A queue that one thread fills and a loop sleeping on a file descriptor drains.

kvroom's worker sleeps in ``zmq.Poller.poll`` and the scheduler's thread
queues commands for it; a demo scheduler sleeps on a pipe while kvroom's worker
reports state changes.  Both want the same thing: put an item, wake the
sleeper, and write as few wake-up bytes as possible (each ``os.write`` lets go
of the GIL, which on a busy 2-core machine can cost the writer a wait for the
GIL to come back).

Theory of operation: ``put`` appends, then writes one byte only when none is
pending (the ``_pending`` flag).  The sleeper, once ``fd`` is readable, calls
:meth:`WakeQueue.wakeups` (or :meth:`WakeQueue.take`), which **drains the pipe
first and clears the flag after**, then pops.  A ``put`` racing with that
either sees the flag still set (its item was appended before the check, the
check came before the clear, the clear before the pop: it is popped), or sees
it clear and writes a byte that stays in the pipe for the next wait.  The other
order, clearing before draining, lets a ``put`` write a byte the drain then
eats (``os.read`` lets go of the GIL mid-drain): the flag stays set with an
empty pipe and every later ``put`` is slept through.
"""

from __future__ import annotations

import collections
import contextlib
import os
from typing import Generic, TypeVar

__all__ = ["WakeQueue"]

T = TypeVar("T")


class WakeQueue(Generic[T]):
    """A deque (``items``) with a wake-up pipe (``fd``) for a loop that sleeps on it."""

    def __init__(self) -> None:
        self.items: collections.deque[T] = collections.deque()
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._pending = False  # a wake-up byte is in the pipe and wakeups() has not run since

    def put(self, item: T) -> None:
        """Append ``item`` and wake the sleeper unless a wake-up is already pending (any thread)."""
        self.items.append(item)  # before the flag: wakeups() clears it before the items are popped
        if self._pending:
            return
        self._pending = True
        self.wake()

    def wake(self) -> None:
        """Write a wake-up byte unconditionally (e.g. to make the loop see a stop flag)."""
        with contextlib.suppress(BlockingIOError):  # the pipe is full: the sleeper wakes anyway
            os.write(self._w, b"x")

    def wakeups(self) -> None:
        """The sleeper: consume the pipe's bytes, then re-arm ``put``'s wake-up (in this order)."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 4096):
                pass
        self._pending = False

    def take(self) -> list[T]:
        """The sleeper: :meth:`wakeups`, then every item queued so far."""
        self.wakeups()
        out = []
        while self.items:
            out.append(self.items.popleft())
        return out

    def close(self) -> None:
        """Close both ends of the pipe."""
        for fd in (self.fd, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
