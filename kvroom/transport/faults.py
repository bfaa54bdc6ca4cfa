"""Classify NIXL exceptions into kvroom's transport errors.

NIXL raises one exception class per status (``nixlRemoteDisconnectError``,
``nixlBackendError``, ...) with no common base class; ``transfer()`` and
``check_xfer_state()`` never return "ERR" in practice (RESEARCH.md).  Anything
that is not a NIXL exception is a programming error and is not classified.
"""

from __future__ import annotations

from kvroom.errors import BackendError, PeerLostError, TransferCancelledError, TransportError

__all__ = ["classify", "is_nixl_error"]

_PEER_LOST = {"nixlRemoteDisconnectError", "nixlNotFoundError"}
_CANCELLED = {"nixlCancelledError"}


def is_nixl_error(exc: BaseException) -> bool:
    """True for exceptions raised by NIXL's bindings."""
    cls = type(exc)
    return cls.__name__.startswith("nixl") and cls.__module__.startswith("nixl")


def classify(exc: BaseException, context: str) -> TransportError | None:
    """The transport error for a NIXL exception, or None if ``exc`` is not NIXL's.

    ``context`` says what was being done ("WRITE room 7 to decode-...") and is
    put in the message, with the NIXL status.
    """
    if isinstance(exc, TransportError):
        return exc
    if not is_nixl_error(exc):
        return None
    name = type(exc).__name__
    detail = f"{context}: {name}: {exc}"
    error: TransportError
    if name in _PEER_LOST:
        error = PeerLostError(detail)
    elif name in _CANCELLED:
        error = TransferCancelledError(detail)
    else:
        error = BackendError(detail)
    error.__cause__ = exc
    return error
