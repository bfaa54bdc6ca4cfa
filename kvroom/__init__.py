"""kvroom: an explicit state machine for every KV-cache transfer room.

Import what a scheduler needs from here; everything else is internal.
"""

from kvroom.errors import (
    BackendError,
    BootstrapError,
    DeadlineExceededError,
    DuplicateRoomError,
    IncompatiblePeerError,
    KVRoomError,
    PeerLostError,
    ProtocolError,
    RemoteFailureError,
    RoomAbortedError,
    RoomStateError,
    TransferCancelledError,
    TransportError,
)
from kvroom.fsm import Deadlines, Event, KVPoll, Role, RoomTable

__all__ = [
    "KVPoll",
    "Role",
    "Event",
    "Deadlines",
    "RoomTable",
    "KVRoomError",
    "TransportError",
    "PeerLostError",
    "BackendError",
    "TransferCancelledError",
    "DeadlineExceededError",
    "RoomAbortedError",
    "RemoteFailureError",
    "RoomStateError",
    "DuplicateRoomError",
    "ProtocolError",
    "IncompatiblePeerError",
    "BootstrapError",
]
