"""Prefill's records: one decode peer, one decode rank's transfer info, one room's send plan.

Apart from :mod:`kvroom.node.prefill` so its write path (:mod:`kvroom.node.prefill_writes`)
types them without importing the side back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvroom.planning import PairRoute, RankRegions
from kvroom.transport.descriptors import IntArray

if TYPE_CHECKING:
    pass

__all__ = ["DecodePeer", "SendPlan", "TransferInfo"]


@dataclass
class DecodePeer:
    """A decode process that completed the handshake."""

    identity: bytes
    agent: str
    principal: str  # who it is: its authenticated CURVE key (z85), or its agent name without keys
    rank: RankRegions  # its layout and regions
    route: PairRoute  # what this rank writes into it (empty: it only takes part in the verdict)
    staging: tuple[int, int]  # its staging ring: (base address, bytes)
    last_seen: float

    @property
    def ranks(self) -> int:
        """How many ranks its side runs (TP x PP): the decode ranks a room waits for."""
        return self.rank.layout.tp_size * self.rank.layout.pp_size


@dataclass(frozen=True)
class TransferInfo:
    """Where one decode rank wants a room's pages.

    ``pages``: its pages after the ``prefix_pages`` it already holds (empty
    for a rank we write nothing into: it only watches the room).
    ``staging``: the ring offset of each ``chunk_pages`` chunk, when decode
    wants our pages staged rather than written in place.  ``state``: its
    rows per state index space (mamba rows, sliding-window pages).
    """

    peer: str
    pages: IntArray
    aux_index: int | None
    prefix_pages: int
    staging: tuple[int, ...] | None
    chunk_pages: int
    state: dict[str, IntArray]
    writes: bool  # the assignment gives us something to write into it
    fingerprint: str | None = None  # the request decode expects (kvroom.request_fingerprint)


@dataclass
class SendPlan:
    """What the scheduler promised in ``init()`` and how far ``send()`` got."""

    num_pages: int
    aux_index: int | None
    state: dict[str, IntArray] | None = None  # rows per state index space, sent with the last chunk
    sent_pages: int = 0
    seqs: dict[str, int] = field(default_factory=dict)  # next notification number per decode agent
    bytes_posted: int = 0  # what the room's WRITE descriptors moved so far (metrics)
