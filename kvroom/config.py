"""Manager configuration with sensible defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvroom.fsm import Deadlines
from kvroom.transport.auth import CurveKeys

__all__ = ["ManagerConfig"]


@dataclass(frozen=True)
class ManagerConfig:
    """Tunables of a :class:`~kvroom.manager.KVManager`.

    ``heartbeat_timeout`` bounds how long a dead or hung peer can hold rooms:
    its rooms fail after that many seconds without a word from it.

    ``busy_poll_interval``: seconds between a prefill worker's NIXL polls while WRITEs
    are in flight, the most a finished WRITE waits to be seen.  NIXL gives no file
    descriptor to wait on, so this is a tick; between polls the worker waits on its
    sockets (the GIL released), and a control message (a vote, a verdict) or a
    scheduler call wakes it at once.  Lower is faster and costs CPU.

    ``target_poll_interval``: seconds between a decode worker's NIXL polls while rooms
    wait for their data.  Decode learns that bytes landed from prefill's WRITTEN on the
    control link, which wakes it at once; its polls only drive NIXL's progress, which
    shared memory and RDMA do not need and UCX over TCP does (a WRITE there completes
    only as the target reads it).  A decode with rooms waiting uses ~20% of a core at
    0.2 ms, ~10% at 1 ms: CPU its engine and prefill's copies may need.

    ``keys``: this process's CURVE key pair and the peer keys it accepts
    (:class:`~kvroom.transport.auth.CurveKeys`); with them the control plane
    authenticates every peer before anything is exchanged.  Without them a
    prefill refuses to listen on a non-loopback ``host`` unless
    ``allow_unauthenticated`` is set (logged as a warning at start).
    """

    deadlines: Deadlines = field(default_factory=Deadlines)
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 5.0
    max_message_bytes: int = 16 << 20
    pending_limit: int = 65536  # transfer infos held for rooms not created yet
    pending_ttl: float = 120.0
    backends: tuple[str, ...] = ("UCX",)
    host: str = "127.0.0.1"
    # "auto": direct WRITEs where head slices line up (equal TP), else via the staging ring;
    # "direct": never stage (per-token descriptors where slices interleave); "staging": always stage
    transfer_mode: str = "auto"
    staging_chunk_pages: int = 16  # pages per staging reservation
    keys: CurveKeys | None = None
    allow_unauthenticated: bool = False
    busy_poll_interval: float = 0.0002
    target_poll_interval: float = 0.001

    @property
    def stall_threshold(self) -> float:
        """A worker pause at least this long may have made a peer declare us lost.

        A peer declares us lost after ``heartbeat_timeout`` of silence; it last
        heard us at most about one ``heartbeat_interval`` before our pause began,
        and we allow one more interval for scheduling delay.
        """
        return max(self.heartbeat_interval, self.heartbeat_timeout - 2 * self.heartbeat_interval)

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval < self.heartbeat_timeout:
            raise ValueError("need 0 < heartbeat_interval < heartbeat_timeout")
        if self.max_message_bytes < 4096:
            raise ValueError("max_message_bytes must be at least 4096")
        if self.pending_limit <= 0 or self.pending_ttl <= 0:
            raise ValueError("pending_limit and pending_ttl must be positive")
        if self.transfer_mode not in ("auto", "direct", "staging"):
            raise ValueError(
                f"transfer_mode must be 'auto', 'direct' or 'staging', got {self.transfer_mode!r}"
            )
        if self.keys is not None and not isinstance(self.keys, CurveKeys):
            raise TypeError(f"keys must be a CurveKeys, got {type(self.keys).__name__}")
        for name in ("busy_poll_interval", "target_poll_interval"):
            if not 0 < getattr(self, name) <= 0.1:
                raise ValueError(f"{name} must be in (0, 0.1] s, got {getattr(self, name)!r}")
        if self.staging_chunk_pages <= 0:
            raise ValueError("staging_chunk_pages must be positive")
