"""One exception hierarchy for kvroom, rooted in :class:`KVRoomError`.

Two families hang off the root and never mix:

* :class:`TransportError` and its children describe faults of the outside world
  (a peer that vanished, a NIXL backend error, a deadline that passed, an abort
  from the other side).  They fail exactly one room and are *returned* to the
  scheduler through ``failure_exception()``; ``send()`` and ``poll()`` never
  raise them.
* :class:`RoomStateError` and friends describe misuse of the local API (calling
  ``send()`` on a room that never started, a duplicate room id).  They are raised
  at once, at the call that made the mistake.

Bad argument values are plain :class:`ValueError` / :class:`TypeError`, as in the
rest of Python.
"""

from __future__ import annotations

__all__ = [
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
    "StagingExhaustedError",
    "BootstrapError",
]


class KVRoomError(Exception):
    """Base class of every error kvroom raises or reports."""


class TransportError(KVRoomError):
    """A fault outside this process failed a room (never a programming error)."""


class PeerLostError(TransportError):
    """The remote process went away (NIXL remote disconnect, missed heartbeats)."""


class BackendError(TransportError):
    """The NIXL backend reported an error for a transfer."""


class TransferCancelledError(TransportError):
    """NIXL cancelled a transfer."""


class DeadlineExceededError(TransportError):
    """A room stayed in one state past its configured deadline."""


class RoomAbortedError(TransportError):
    """The room was aborted, locally or by the peer."""


class RemoteFailureError(TransportError):
    """The peer reported that the room failed on its side."""


class RequestMismatchError(RemoteFailureError):
    """Decode's request for a room is not the request prefill holds under that room id.

    The two sides' request fingerprints (:func:`kvroom.request_fingerprint`: token count and a
    hash of the token ids) differ, so the router gave one room id to two requests.  The room
    fails on both sides before any byte moves: one request's KV never reaches another.
    """


class RoomStateError(KVRoomError):
    """An API call is not allowed in the room's current state.

    The message names the room, the role, the state and the event, like h11's
    ``LocalProtocolError``.
    """

    def __init__(self, room: int, role: str, state: str, event: str, detail: str = "") -> None:
        self.room = room
        self.role = role
        self.state = state
        self.event = event
        msg = f"room {room} ({role}): event {event!r} is not allowed in state {state}"
        if detail:
            msg = f"{msg}: {detail}"
        super().__init__(msg)


class DuplicateRoomError(KVRoomError):
    """A room id that is still live was created again; the existing room is untouched."""


class ProtocolError(KVRoomError):
    """A control-plane frame could not be decoded or broke the protocol."""


class IncompatiblePeerError(KVRoomError):
    """A peer's KV layout or protocol version cannot be served by this manager."""


class BootstrapError(KVRoomError):
    """The manager could not start (address in use, NIXL backend unavailable)."""


class StagingExhaustedError(KVRoomError):
    """A room needs more staging space than the decode staging ring holds at all."""
