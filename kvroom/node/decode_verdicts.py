"""Decode's verdicts: the room protocol's inputs in, its messages to prefill out.

:class:`DecodeVerdicts` is the base of every part of
:class:`~kvroom.node.decode.DecodeSide` (staging, page lists and arrivals, the
loop): it names the side's state, set by ``DecodeSide.__init__``, and carries
out the protocol.  Every input reaches a room through :meth:`DecodeVerdicts.react`,
which asks the room's :class:`~kvroom.protocol.DecodeVerdict` (the table of
:mod:`kvroom.protocol.spec`) and sends what it says: READY votes, relayed
COMMITs, ABORTs.  A decode room may only become Failed once no WRITE for it can
still land in its pages (its sources confirm, bounded by twice the heartbeat
timeout: ``failing_since``), so the scheduler can reuse them at once.  An abort
for a prefill rank still being greeted is queued on the peer (bounded) and sent
once the handshake completes: prefill may hold the room already.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import torch

from kvroom.fsm import KVPoll, RoomStore, TransitionRecord
from kvroom.fsm.room import Room
from kvroom.node.shares import Source
from kvroom.protocol import DecodeVerdict, Input, Msg, Outcome
from kvroom.protocol.verdicts import Verdicts, fire_actions
from kvroom.transport.staging import Reservation, StagingRing, StagingStore

if TYPE_CHECKING:
    from kvroom.node.decode_state import PrefillPeer, ReceivePlan
    from kvroom.node.host import NodeHost

__all__ = ["DecodeVerdicts"]


class DecodeVerdicts:
    """The side's state and verdicts, shared by the parts of :class:`~kvroom.node.decode.DecodeSide`."""

    m: NodeHost
    plans: RoomStore[ReceivePlan]
    verdicts: Verdicts[DecodeVerdict]
    failing_since: RoomStore[float]  # rooms failing once their sources confirm: since when
    staging: StagingStore
    prefetched: RoomStore[int]
    ring: StagingRing
    peers: dict[str, PrefillPeer]  # by bootstrap address
    by_agent: dict[str, PrefillPeer]
    waiting_staging: list[Room]  # rooms whose page list waits for ring space
    _registered: set[Any]
    _shares: dict[tuple[str, ...], list[Source]]  # the assignment per set of peers
    # staging reserved for rooms not created yet: room id -> (reservations, pages, expiry)
    _early: dict[int, tuple[dict[tuple[Hashable, ...], Reservation], int, float]]
    _early_lock: threading.Lock
    _views: list[torch.Tensor]

    def on_transition(self, record: TransitionRecord) -> None:
        """Observer hook: nothing to do on decode."""

    def abort(self, room: Room, reason: str) -> None:
        """Worker: a local abort."""
        self.react(room, Input.LOCAL_ABORT, reason=reason)

    def react(
        self,
        room: Room,
        inp: Input,
        rank: str | None = None,
        *,
        reason: str = "",
        error: BaseException | None = None,
        state: KVPoll | None = None,
    ) -> None:
        """Worker: feed one input to the room's protocol and carry out what it says.

        ``rank``: the prefill address it came from (None: this process).
        ``state``: act only if the room is still in this state (deadlines).
        """

        def decide(verdict: DecodeVerdict, now_state: KVPoll) -> Outcome:
            failing = verdict.waiting is not None
            outcome = verdict.on(now_state, inp, rank, reason=reason, error=error)
            if verdict.waiting is not None and not failing:  # the confirmations have a bound
                self.failing_since.put_locked(room, self.m.clock())
            return outcome

        outcome = self.verdicts.decide(room, decide, state)
        if outcome is None:
            return
        if outcome.unexpected is not None:
            self.m.log.warning("kvroom.unexpected_input", room=room.id, detail=str(outcome.unexpected))
        for send in fire_actions(self.m.table, room, outcome, self.m.clock()):
            peer = self.peers.get(send.to)
            if peer is None:
                continue  # lost: it has nothing of the room
            fields: dict[str, Any] = {"room": room.id}
            if send.msg is Msg.ABORT:
                fields["reason"] = send.reason[:2000]
            if peer.agent is None:  # greeting: prefill may hold the room already (its request came first)
                if send.msg is Msg.ABORT:
                    peer.aborts.append((room.id, fields["reason"], None))
                    del peer.aborts[: -self.m.config.pending_limit]
                continue
            peer.client.send(send.msg.value, fields)
