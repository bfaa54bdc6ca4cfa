"""The observer that wakes a demo node's scheduler loop when one of its rooms changes state.

kvroom calls a manager's observer on its worker thread, with the room's lock
held.  :class:`WakeObserver` forwards every record to the node's audit
observer (if any) and, for a real state change, queues the room's id on a
:class:`~kvroom.node.wake.WakeQueue`: one wake-up byte on a pipe while any id
is pending (each ``os.write`` on kvroom's worker lets go of the GIL, so one
per burst, not one per transition).  The scheduler loop
(:mod:`kvroom.demo.scheduler`) sleeps on that pipe and its parent's pipe, and
takes the ids that changed.  Terminal transitions also keep their time, so
a room's result carries when it ended, not when the loop noticed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvroom.fsm.observer import CleanupRecord, CreatedRecord, IgnoredRecord, TransitionRecord
from kvroom.node.wake import WakeQueue

if TYPE_CHECKING:
    from kvroom.observe.audit import BackgroundObserver

__all__ = ["WakeObserver"]


class WakeObserver:
    """The manager's observer: forwards to the audit observer and wakes the scheduler loop."""

    def __init__(self, inner: BackgroundObserver | None) -> None:
        self.inner = inner
        self.queue: WakeQueue[int] = WakeQueue()
        self.fd = self.queue.fd
        """The pipe the scheduler loop sleeps on."""
        self.ended: dict[int, float] = {}
        """Room -> time of its terminal transition (taken by the loop when it reports the room)."""

    def on_create(self, record: CreatedRecord) -> None:
        """Forward a creation."""
        if self.inner is not None:
            self.inner.on_create(record)

    def on_transition(self, record: TransitionRecord) -> None:
        """Forward a transition; a state change wakes the loop (a terminal one keeps its time)."""
        if self.inner is not None:
            self.inner.on_transition(record)
        if record.src is not record.dst:
            if record.dst.name in ("Success", "Failed"):
                self.ended[record.room] = record.time
            self.queue.put(record.room)

    def on_cleanup(self, record: CleanupRecord) -> None:
        """Forward a cleanup."""
        if self.inner is not None:
            self.inner.on_cleanup(record)

    def on_ignored(self, record: IgnoredRecord) -> None:
        """Forward an ignored event."""
        if self.inner is not None:
            self.inner.on_ignored(record)

    def take(self) -> list[int]:
        """Rooms that changed since the last call."""
        return self.queue.take()

    def close(self) -> None:
        """Close the audit observer (flushing it) and the pipe."""
        if self.inner is not None:
            self.inner.close()
        self.queue.close()
