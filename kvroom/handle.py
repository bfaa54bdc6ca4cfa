"""What senders and receivers share: a scheduler's handle on one room."""

from __future__ import annotations

from kvroom.errors import RoomStateError
from kvroom.fsm import Event, KVPoll
from kvroom.fsm.room import Room
from kvroom.manager import KVManager

__all__ = ["RoomHandle"]


class RoomHandle:
    """``poll``, ``failure_exception`` and ``clear`` on one room of a manager."""

    manager: KVManager
    room: Room
    _cleared: bool = False

    @property
    def bootstrap_room(self) -> int:
        """The room id."""
        return self.room.id

    def poll(self) -> KVPoll:
        """The room's state; never raises transport errors.

        It does not wait on the room's lock (the worker holds it while it
        moves the room on): the state is one attribute, read as it stands.
        Only Failed is read again under the lock, as its cleanup runs under it
        right after the state is set: a Failed room is only ever seen clean.
        After :meth:`clear` the handle is spent: polling it raises
        :class:`~kvroom.errors.RoomStateError` (a stale handle must not report
        a finished room as if it were the current one).
        """
        self.manager.check_alive()
        self._check_not_cleared("poll")
        state = self.room.state
        if state is KVPoll.Failed:
            with self.room.lock:
                return self.room.state
        return state

    def failure_exception(self) -> BaseException:
        """Raise the cause of a Failed room (its state is already clean)."""
        with self.room.lock:
            error = self.manager.table.failure_exception(self.room)
        raise error

    def clear(self) -> None:
        """Drop a finished room's state (Success); Failed rooms are already clean.

        Once per handle: a second call raises :class:`~kvroom.errors.RoomStateError`.
        """
        self._check_not_cleared("clear")
        if self.room.state is not KVPoll.Failed:
            self.manager.fire(self.room, Event.CLEAR)  # RoomStateError before a terminal state
        self._cleared = True

    def _check_not_cleared(self, call: str) -> None:
        if self._cleared:
            room = self.room
            raise RoomStateError(room.id, room.role.value, room.state.name, call, "the room was cleared")
