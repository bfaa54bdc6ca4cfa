"""What the scheduler-side connector tells the workers each step, and the handshake."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
)

__all__ = ["SendJob", "RecvJob", "KVRoomMetadata", "KVRoomHandshake"]


@dataclass(frozen=True)
class SendJob:
    """Prefill: WRITE ``pages`` (the request's blocks, prompt order) into room ``room``.

    ``pages`` empty: the request ended without KV to send (aborted, errored);
    the worker opens the room only to fail it, so decode hears at once.
    ``fingerprint``: the request's :func:`kvroom.request_fingerprint` (decode's must match).
    """

    req_id: str
    room: int
    pages: tuple[int, ...]
    fingerprint: str | None = None


@dataclass(frozen=True)
class RecvJob:
    """Decode: receive room ``room`` from ``bootstrap_addr`` into ``pages``.

    ``pages`` are the request's blocks after its local prefix hit of
    ``prefix_len`` tokens (a whole number of blocks); prefill skips that prefix.
    ``fingerprint``: the request's :func:`kvroom.request_fingerprint`, checked by prefill.
    ``pages`` empty: the request ended before its receive opened; the worker opens the
    room only to abort it, so a prefill that holds it frees its blocks at once.
    """

    req_id: str
    room: int
    bootstrap_addr: tuple[str, ...]
    pages: tuple[int, ...]
    prefix_len: int
    fingerprint: str | None = None


@dataclass
class KVRoomMetadata(KVConnectorMetadata):  # type: ignore[misc]
    """One step's work for the workers: rooms to open, receives to abort."""

    sends: list[SendJob] = field(default_factory=list)
    recvs: list[RecvJob] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)  # decode req ids whose receive is abandoned

    def empty(self) -> bool:
        """True when the step carries no work."""
        return not (self.sends or self.recvs or self.cancels)


@dataclass
class KVRoomHandshake(KVConnectorHandshakeMetadata):  # type: ignore[misc]
    """A worker's kvroom bootstrap address (prefill) and agent, for the scheduler."""

    bootstrap_addr: str
    agent: str
    tp_rank: int
