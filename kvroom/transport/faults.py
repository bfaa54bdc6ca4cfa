"""Classify NIXL exceptions into kvroom's transport errors.

NIXL raises one exception class per status (``nixlRemoteDisconnectError``,
``nixlBackendError``, ...) with no common base class; ``transfer()`` and
``check_xfer_state()`` never return "ERR" in practice (RESEARCH.md).  Anything
that is not a NIXL exception is a programming error and is not classified.
"""

from __future__ import annotations

from typing import TypeVar

from kvroom.errors import BackendError, PeerLostError, TransferCancelledError, TransportError

__all__ = ["MAX_DETAIL", "MAX_REASON", "bounded", "classify", "for_room", "is_nixl_error"]

E = TypeVar("E", bound=BaseException)

MAX_DETAIL = 200
"""At most this many characters of a NIXL exception's own text go into a message."""

MAX_REASON = 400
"""At most this many characters in one room's failure reason."""

_PEER_LOST = {"nixlRemoteDisconnectError", "nixlNotFoundError"}
_CANCELLED = {"nixlCancelledError"}


def is_nixl_error(exc: BaseException) -> bool:
    """True for exceptions raised by NIXL's bindings."""
    cls = type(exc)
    return cls.__name__.startswith("nixl") and cls.__module__.startswith("nixl")


def classify(exc: BaseException, context: str) -> TransportError | None:
    """The transport error for a NIXL exception, or None if ``exc`` is not NIXL's.

    ``context`` says what was being done ("WRITE to decode-...") and is put in
    the message, with the NIXL status and at most :data:`MAX_DETAIL` characters
    of the exception's text.  One NIXL call may serve several rooms: give each
    its own error with :func:`for_room`.
    """
    if isinstance(exc, TransportError):
        return exc
    if not is_nixl_error(exc):
        return None
    name = type(exc).__name__
    detail = f"{context}: {name}: {bounded(str(exc), MAX_DETAIL)}"
    error: TransportError
    if name in _PEER_LOST:
        error = PeerLostError(detail)
    elif name in _CANCELLED:
        error = TransferCancelledError(detail)
    else:
        error = BackendError(detail)
    error.__cause__ = exc
    return error


def bounded(text: str, limit: int = MAX_REASON) -> str:
    """``text`` cut to ``limit`` characters, the cut marked with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def for_room(error: E, room_id: int, what: str = "") -> E:
    """``error`` as one room's failure: the same class and cause, a message naming that room only.

    ``what`` says how the fault reached the room ("decode peer lost"); the
    message is ``room N: [what: ]<error>``, at most :data:`MAX_REASON` characters.
    """
    text = bounded(f"room {room_id}: {what}: {error}" if what else f"room {room_id}: {error}")
    try:
        mine = type(error)(text)
    except TypeError:  # a class that takes more than a message: keep it as it is
        return error
    mine.__cause__ = error.__cause__ if error.__cause__ is not None else error
    return mine
