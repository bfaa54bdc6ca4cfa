"""Where each side keeps its rooms' protocol state, and how it applies an outcome.

Both sides hold one verdict object per room in a :class:`Verdicts` store
(registered with the room table, so the Failed cleanup removes it), decide
under the room's lock, then fire the room events and send the messages the
outcome lists.  Sans-I/O: sending is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from kvroom.fsm.room import Room
from kvroom.fsm.spec import KVPoll
from kvroom.fsm.stores import RoomStore
from kvroom.fsm.table import RoomTable
from kvroom.protocol.rooms import Fire, Outcome, Send

__all__ = ["Verdicts", "fire_actions"]

V = TypeVar("V")


class Verdicts(RoomStore[V]):
    """The protocol state of every live room of one side, made on first use by ``make``."""

    def __init__(self, make: Callable[[Room], V]) -> None:
        super().__init__("verdicts")
        self.make = make

    def of(self, room: Room) -> V | None:
        """The room's verdict object (None once the room is gone)."""
        verdict = self.get(room.id)
        if verdict is None:
            verdict = self.make(room)
            if not self.put(room, verdict):
                return None
        return verdict

    def decide(
        self, room: Room, decide: Callable[[V, KVPoll], Outcome], state: KVPoll | None = None
    ) -> Outcome | None:
        """Run ``decide(verdict, room state)`` under the room's lock; None when the room is gone
        or no longer in ``state`` (a deadline that lost a race)."""
        verdict = self.of(room)
        if verdict is None:
            return None
        with room.lock:
            if not room.live or (state is not None and room.state is not state):
                return None
            return decide(verdict, room.state)


def fire_actions(table: RoomTable, room: Room, outcome: Outcome, now: float) -> list[Send]:
    """Fire the outcome's room events in order; return its messages for the caller to send."""
    sends: list[Send] = []
    for action in outcome.actions:
        if isinstance(action, Fire):
            table.fire(
                room,
                action.event,
                now,
                error=action.error,
                reason=action.reason or None,
                chunks=action.chunks,
            )
        else:
            sends.append(action)
    return sends
