"""Decode's records: one prefill peer, one room's receive plan.

Apart from :mod:`kvroom.node.decode` so its staging half (:mod:`kvroom.node.decode_staging`)
types them without importing the side back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvroom.node.shares import Source
from kvroom.planning import RankLayout
from kvroom.transport.control import ControlClient
from kvroom.transport.descriptors import IntArray

if TYPE_CHECKING:
    pass

__all__ = ["PrefillPeer", "ReceivePlan"]


@dataclass
class PrefillPeer:
    """One prefill bootstrap address this decode talks to."""

    address: str
    client: ControlClient
    last_heard: float
    last_ping: float = 0.0
    agent: str | None = None  # set by welcome
    layout: RankLayout | None = None  # set by welcome
    queued: list[int] = field(default_factory=list)  # rooms waiting for the handshake
    # (room, reason, fingerprint: None, or the one request it is for) said after the handshake
    aborts: list[tuple[int, str, str | None]] = field(default_factory=list)


@dataclass
class ReceivePlan:
    """What this room asked for: its pages, aux slot, prefix and state rows; per-rank progress."""

    pages: IntArray
    aux_index: int | None
    prefix_pages: int
    state: dict[str, IntArray] = field(default_factory=dict)  # rows per state index space
    fingerprint: str | None = None  # the request this room is for (kvroom.request_fingerprint)
    sources: dict[str, Source] = field(default_factory=dict)  # filled when the page list is sent
    sent: bool = False
