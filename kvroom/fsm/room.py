"""The per-room record the state machine drives (kept small: ``__slots__``)."""

from __future__ import annotations

import threading
from typing import Protocol

from kvroom.fsm.states import KVPoll, Role

__all__ = ["Room", "RoomOwner"]


class RoomOwner(Protocol):
    """What a room needs from the table that holds it."""

    def cleanup(self, room: Room) -> None:
        """Remove every piece of state held for ``room`` (idempotent)."""


class Room:
    """One KV-transfer room on one side.

    ``state`` is only ever changed by the room table, under ``lock``.  The
    counters feed the declared guards; ``error`` latches the first failure so
    ``failure_exception()`` still works after every store was cleaned.
    """

    __slots__ = (
        "aux_done",
        "chunks_done",
        "chunks_needed",
        "deadline",
        "error",
        "id",
        "infos_got",
        "infos_needed",
        "last",
        "live",
        "lock",
        "owner",
        "peers",
        "role",
        "since",
        "state",
    )

    def __init__(
        self, room_id: int, role: Role, owner: RoomOwner, now: float, peers: tuple[str, ...] = ()
    ) -> None:
        self.id = room_id
        self.role = role
        self.state = KVPoll.Bootstrapping
        self.owner = owner
        self.lock = threading.Lock()
        self.live = True  # False once cleanup removed it from every store
        self.peers = peers  # the peers this room is bound to (several under tensor parallelism)
        self.since = now  # when the current state was entered
        self.last = now  # time of the latest event applied
        self.deadline: float | None = None
        self.error: BaseException | None = None
        self.infos_needed = 1
        self.infos_got = 0
        self.chunks_needed = 0
        self.chunks_done = 0
        self.aux_done = False

    @property
    def peer(self) -> str | None:
        """The bound peers as one string, for audit records (None when unbound)."""
        return ",".join(self.peers) if self.peers else None

    def __repr__(self) -> str:
        return f"<Room {self.id} {self.role.value} {self.state.name}{'' if self.live else ' cleared'}>"
