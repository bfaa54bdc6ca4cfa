"""What the state machine reports: records handed to an observer.

The core never logs; it calls an :class:`Observer`.  The structlog adapter in
:mod:`kvroom.observe.audit` turns these records into audit events.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from kvroom.fsm.spec import Event, KVPoll, Role

__all__ = [
    "CreatedRecord",
    "TransitionRecord",
    "CleanupRecord",
    "IgnoredRecord",
    "Observer",
    "RecordingObserver",
]


class CreatedRecord(NamedTuple):
    """A room was created in Bootstrapping (so time spent there can be measured)."""

    room: int
    role: Role
    peer: str | None
    time: float


class TransitionRecord(NamedTuple):
    """A room moved from ``src`` to ``dst`` (equal for internal transitions)."""

    room: int
    role: Role
    peer: str | None
    src: KVPoll
    dst: KVPoll
    event: Event
    reason: str | None
    time: float


class CleanupRecord(NamedTuple):
    """A room's state was removed; ``stores`` names the stores that held some."""

    room: int
    role: Role
    state: KVPoll
    stores: tuple[str, ...]
    time: float


class IgnoredRecord(NamedTuple):
    """An event changed nothing (terminal, cleared or unknown room, or no rule)."""

    room: int
    role: Role
    state: KVPoll | None  # None: the room is unknown (never created or cleared)
    event: Event
    time: float


class Observer(Protocol):
    """Receives every creation, transition, cleanup and ignored event, in order per room.

    Called with the room's lock held (``on_create``: before the room is
    visible to other threads): an observer must not fire events itself.
    """

    def on_create(self, record: CreatedRecord) -> None:
        """A room was created."""

    def on_transition(self, record: TransitionRecord) -> None:
        """A transition happened."""

    def on_cleanup(self, record: CleanupRecord) -> None:
        """A room's stores were cleaned."""

    def on_ignored(self, record: IgnoredRecord) -> None:
        """An event was ignored."""


class RecordingObserver:
    """Keeps every record in lists; for tests and small tools."""

    def __init__(self) -> None:
        self.created: list[CreatedRecord] = []
        self.transitions: list[TransitionRecord] = []
        self.cleanups: list[CleanupRecord] = []
        self.ignored: list[IgnoredRecord] = []

    def on_create(self, record: CreatedRecord) -> None:
        """Append the record."""
        self.created.append(record)

    def on_transition(self, record: TransitionRecord) -> None:
        """Append the record."""
        self.transitions.append(record)

    def on_cleanup(self, record: CleanupRecord) -> None:
        """Append the record."""
        self.cleanups.append(record)

    def on_ignored(self, record: IgnoredRecord) -> None:
        """Append the record."""
        self.ignored.append(record)
