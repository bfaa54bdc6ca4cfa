"""What senders and receivers share: a scheduler's handle on one room."""

from __future__ import annotations

from kvroom.fsm import Event, KVPoll
from kvroom.fsm.room import Room
from kvroom.manager import KVManager

__all__ = ["RoomHandle"]


class RoomHandle:
    """``poll``, ``failure_exception`` and ``clear`` on one room of a manager."""

    manager: KVManager
    room: Room

    @property
    def bootstrap_room(self) -> int:
        """The room id."""
        return self.room.id

    def poll(self) -> KVPoll:
        """The room's state; never raises transport errors.

        Read under the room's lock: a Failed room is only ever seen clean.
        """
        self.manager.check_alive()
        with self.room.lock:
            return self.room.state

    def failure_exception(self) -> BaseException:
        """Raise the cause of a Failed room (its state is already clean)."""
        with self.room.lock:
            error = self.manager.table.failure_exception(self.room)
        raise error

    def clear(self) -> None:
        """Drop a finished room's state (Success); Failed rooms are already clean."""
        if self.room.state is KVPoll.Failed:
            return
        self.manager.fire(self.room, Event.CLEAR)
