"""kvroom: an explicit state machine for every KV-cache transfer room.

Import what a scheduler needs from here; everything else is internal.
"""

from typing import TYPE_CHECKING

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
    RequestMismatchError,
    RoomAbortedError,
    RoomStateError,
    StagingExhaustedError,
    TransferCancelledError,
    TransportError,
)
from kvroom.fingerprint import request_fingerprint
from kvroom.fsm import Deadlines, Event, KVPoll, Role, RoomTable

if TYPE_CHECKING:
    from kvroom.config import ManagerConfig
    from kvroom.manager import KVManager
    from kvroom.observe.audit import AuditObserver, json_lines_logger
    from kvroom.planning import ModelLayout, RankLayout, RankRegions
    from kvroom.receiver import KVReceiver
    from kvroom.sender import KVSender
    from kvroom.transport.auth import CurveKeys
    from kvroom.transport.layout import KVPool
    from kvroom.transport.regions import Region, RegionPool

_LAZY = {
    "KVManager": "kvroom.manager",
    "KVSender": "kvroom.sender",
    "KVReceiver": "kvroom.receiver",
    "KVPool": "kvroom.transport.layout",
    "Region": "kvroom.transport.regions",
    "RegionPool": "kvroom.transport.regions",
    "ModelLayout": "kvroom.planning",
    "RankLayout": "kvroom.planning",
    "RankRegions": "kvroom.planning",
    "ManagerConfig": "kvroom.config",
    "CurveKeys": "kvroom.transport.auth",
    "AuditObserver": "kvroom.observe.audit",
    "json_lines_logger": "kvroom.observe.audit",
}


def __getattr__(name: str) -> object:
    """Import the transport-backed API (torch, NIXL, ZMQ) only when used."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvroom' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "KVManager",
    "KVSender",
    "KVReceiver",
    "KVPool",
    "ModelLayout",
    "RankLayout",
    "RankRegions",
    "Region",
    "RegionPool",
    "ManagerConfig",
    "CurveKeys",
    "AuditObserver",
    "json_lines_logger",
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
    "RequestMismatchError",
    "RoomStateError",
    "DuplicateRoomError",
    "ProtocolError",
    "IncompatiblePeerError",
    "BootstrapError",
    "StagingExhaustedError",
    "request_fingerprint",
]
