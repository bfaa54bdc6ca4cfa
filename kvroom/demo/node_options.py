"""What a demo node is told when it starts, and what it reports for each room.

:class:`NodeOptions` travels to a node process once, at spawn (it is picklable):
pool shape, model preset, control-plane settings, deadlines, and how the
scheduler loop runs.  :class:`RoomResult` travels back for every room that
reached a terminal state on that node.  Both are plain data, shared by the
parent (:mod:`kvroom.demo.cluster`) and the node side (:mod:`kvroom.demo.nodes`,
:mod:`kvroom.demo.scheduler`), so neither side imports the other for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["NodeOptions", "RoomResult"]


@dataclass(frozen=True)
class NodeOptions:
    """Everything a node needs, picklable."""

    layers: int = 4  # pool tensors (K and V of a model layer are two)
    page_bytes: int = 16 << 10  # bytes of one page of one tensor
    pool_pages: int = 2048
    aux_slots: int = 256
    aux_bytes: int = 64
    chunk_pages: int = 8
    concurrency: int = 32
    port: int = 0
    bootstrap_addr: str = ""
    host: str = "127.0.0.1"
    audit_log: str | None = None
    deadlines: tuple[float | None, float | None, float | None] = (30.0, 120.0, 30.0)
    heartbeat: tuple[float, float] = (0.25, 3.0)
    name: str = "node"
    env: dict[str, str] = field(default_factory=dict)
    stderr_path: str | None = None  # where the node's stderr (NIXL's own logs) goes
    # a preset of kvroom.presets (its buffers, aux and state rows) with ``model_layers`` layers
    # (None: the preset's); None: ``layers`` opaque uint8 tensors of ``page_bytes`` pages
    model: str | None = None
    model_layers: int | None = None
    # a directory with the CURVE pairs prefill.key(_secret) and decode.key(_secret); None: no keys
    keys_dir: str | None = None
    # 0: event-driven loops, a room's chunks all sent at once (the demo); > 0: a scheduler
    # step, then a sleep this long: each step polls every room and sends one chunk a room,
    # so faults land mid-transfer (chaos).  Both stamp and check pages the same cheap way.
    chunk_interval: float = 0.001
    metrics_interval: float | None = None  # send metric snapshots this often (None: no metrics)
    seed: int = 0  # of the page pattern (the same on every node)
    # False (``kvroom demo --no-verify``): prefill stamps nothing and decode checks nothing
    verify: bool = True


@dataclass
class RoomResult:
    """What happened to one room on one node.

    ``started``: creation (prefill) or page list sent (decode); ``finished``:
    its terminal transition (both ``time.monotonic()``, comparable across processes).
    ``verified``: decode's byte check of a Success (None: not checked).
    """

    room: int
    role: str
    node: str
    state: str
    error: str | None
    error_type: str | None
    verified: bool | None
    footprint: tuple[str, ...]
    started: float
    finished: float
    bytes: int
    pages: int = 0  # pages moved (the request's, less decode's cached prefix)
