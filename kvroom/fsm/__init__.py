"""The sans-I/O core: room state machines declared as data, and the room table.

No NIXL, no sockets, no clocks, no logging: time is passed in and every
transition is reported to an :class:`~kvroom.fsm.observer.Observer`.
"""

from kvroom.fsm.observer import (
    CleanupRecord,
    CreatedRecord,
    IgnoredRecord,
    Observer,
    RecordingObserver,
    TransitionRecord,
)
from kvroom.fsm.room import Room
from kvroom.fsm.spec import MACHINES, RULES, TERMINAL, Event, KVPoll, Origin, Role, Rule, build_machine
from kvroom.fsm.stores import KeyedStore, RoomStore, Store
from kvroom.fsm.table import STAGING_STORES, STANDARD_STORES, Deadlines, RoomTable

__all__ = [
    "KVPoll",
    "Role",
    "Event",
    "Origin",
    "Rule",
    "RULES",
    "TERMINAL",
    "MACHINES",
    "build_machine",
    "Room",
    "RoomTable",
    "Deadlines",
    "Store",
    "RoomStore",
    "KeyedStore",
    "STANDARD_STORES",
    "STAGING_STORES",
    "Observer",
    "RecordingObserver",
    "TransitionRecord",
    "CleanupRecord",
    "IgnoredRecord",
    "CreatedRecord",
]
