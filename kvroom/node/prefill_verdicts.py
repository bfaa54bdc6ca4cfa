"""Prefill's verdicts: the room protocol's inputs in, its word to decode out.

:class:`PrefillVerdicts` is the base of every part of
:class:`~kvroom.node.prefill.PrefillSide` (peers, room messages, the write path):
it names the side's state, set by ``PrefillSide.__init__``, and holds what the
parts share.  Every protocol input reaches a room through :meth:`PrefillVerdicts.react`,
which asks the room's :class:`~kvroom.protocol.PrefillVerdict` (the table of
:mod:`kvroom.protocol.spec`) and fires what it says.  The verdict follows
:mod:`kvroom.protocol`: the coordinator (TP rank 0 of PP stage 0) reaches
Success once its WRITEs completed and every decode rank voted READY, and tells
them COMMIT (:meth:`PrefillVerdicts.on_transition` decides it, :meth:`PrefillVerdicts.send_commits`
sends it on the worker as soon as the transition released the room's lock);
a room with one rank on each side commits at its own DONE instead, in the
announcement of its last WRITE (:meth:`~kvroom.node.prefill_writes.PrefillWrites._done`); a
Failed room is told to its decode ranks only once none of its WRITEs can still
land (drained first), and leaves a tombstone so late page lists for it are
answered at once.
"""

from __future__ import annotations

import collections
import threading
from typing import TYPE_CHECKING

from kvroom.errors import PeerLostError, ProtocolError
from kvroom.fsm import KVPoll, RoomStore, TransitionRecord
from kvroom.fsm.room import Room
from kvroom.node.outbox import Outbox
from kvroom.node.tombstones import Forgone, Tombstones
from kvroom.protocol import Input, Outcome, PrefillVerdict
from kvroom.protocol.verdicts import Verdicts, fire_actions
from kvroom.transport.auth import ServerAuth
from kvroom.transport.codec import Message
from kvroom.transport.control import ControlServer
from kvroom.transport.nixl import Transfer

if TYPE_CHECKING:
    from kvroom.node.host import NodeHost
    from kvroom.node.prefill_state import DecodePeer, SendPlan

__all__ = ["PrefillVerdicts"]


class PrefillVerdicts:
    """The side's state and verdicts, shared by the parts of :class:`~kvroom.node.prefill.PrefillSide`."""

    m: NodeHost
    auth: ServerAuth | None
    server: ControlServer
    coordinator: bool  # TP rank 0 of PP stage 0: decides every room's verdict
    send_plans: RoomStore[SendPlan]
    handles: RoomStore[list[Transfer]]
    dst_counts: RoomStore[int]  # required_dst_info_num a sender declared
    fingerprints: RoomStore[str]  # the request each room was created for
    verdicts: Verdicts[PrefillVerdict]
    peers: dict[bytes, DecodePeer]
    by_agent: dict[str, DecodePeer]
    pending: collections.OrderedDict[int, list[tuple[bytes, Message, float]]]
    tombstones: Tombstones
    orphans: Tombstones
    lost: Tombstones
    forgone: Forgone  # (room, request) decode said will never ask for the room
    active: list[Transfer]
    outbox: Outbox
    draining: dict[int, tuple[tuple[str, ...], str, list[Transfer]]]
    foreign: int
    unauthenticated: int
    commits: collections.deque[tuple[int, tuple[str, ...]]]  # decided on the worker, not sent yet

    if TYPE_CHECKING:  # the parts' (peers, room messages), for each other

        def peer_lost(self, peer: DecodePeer, error: PeerLostError, now: float) -> None: ...

        def _on_message(
            self, identity: bytes, msg: Message | ProtocolError, now: float, user: str | None = None
        ) -> None: ...

    def on_transition(self, record: TransitionRecord) -> None:
        """Observer hook (room lock held): tell the decode ranks the verdict.

        The coordinator's Success is the commit; any rank's Failed is told once
        none of its WRITEs can still land.
        """
        if record.dst is KVPoll.Success and self.coordinator and record.src is not KVPoll.Success:
            room = self.m.table.get(record.room)
            verdict = self.verdicts.get(record.room)
            alone = verdict is not None and verdict.alone  # committed in its last WRITTEN instead
            if room is not None and not alone:
                peers = room.peers
                if threading.current_thread() is self.m.worker:  # the usual case: a vote or a DONE
                    # as soon as the transition has let go of the room's lock (send_commits), not a
                    # loop turn later, and not under the lock: a scheduler's poll() must not wait on it
                    self.commits.append((record.room, peers))
                else:
                    self.m.enqueue(lambda: self._send_commit(record.room, peers))
            return
        if record.dst is not KVPoll.Failed:
            return
        room = self.m.table.get(record.room)
        peers = room.peers if room is not None else ()
        transfers = list(self.handles.get(record.room) or ())
        reason = record.reason or "failed on prefill"
        self.m.enqueue(lambda: self._after_failure(record.room, peers, reason, transfers))

    def send_commits(self) -> None:
        """Worker, holding no room lock: send the COMMITs the coordinator's Successes decided."""
        while self.commits:
            room_id, peers = self.commits.popleft()
            self._send_commit(room_id, peers)

    def _send_commit(self, room_id: int, peers: tuple[str, ...]) -> None:
        for agent in peers:
            peer = self.by_agent.get(agent)
            if peer is not None:
                self.server.send(peer.identity, "commit", {"room": room_id})

    def _after_failure(
        self, room_id: int, peers: tuple[str, ...], reason: str, transfers: list[Transfer]
    ) -> None:
        self.tombstones.add(room_id, reason, self.m.clock())
        for identity, _msg, _born in self.pending.pop(room_id, ()):  # e.g. failed before it adopted them
            self._send_failed(identity, room_id, reason)
        peers = tuple(p for p in peers if p in self.by_agent)  # a lost peer needs no word
        if not peers:
            return
        live = [t for t in transfers if not t.released]
        live += [t for t in self.active if room_id in t.room_ids and not t.released and t not in live]
        if live:
            self.draining[room_id] = (peers, reason, live)
        else:
            for agent in peers:
                self._notify_failed(agent, room_id, reason)

    def _notify_failed(self, agent: str, room_id: int, reason: str) -> None:
        peer = self.by_agent.get(agent)
        if peer is not None:
            self._send_failed(peer.identity, room_id, reason)

    def _send_failed(self, identity: bytes, room_id: int, reason: str) -> None:
        self.server.send(identity, "failed", {"room": room_id, "reason": reason[:2000]})

    def react(
        self,
        room: Room,
        inp: Input,
        rank: str | None = None,
        *,
        reason: str = "",
        error: BaseException | None = None,
        ranks_left: int = 1,
        state: KVPoll | None = None,
    ) -> None:
        """Feed one input to the room's protocol and fire what it says (any thread).

        ``rank``: the decode agent it came from (None: this process).
        ``state``: act only if the room is still in this state (deadlines).
        """

        def decide(verdict: PrefillVerdict, now_state: KVPoll) -> Outcome:
            return verdict.on(now_state, inp, rank, reason=reason, error=error, ranks_left=ranks_left)

        outcome = self.verdicts.decide(room, decide, state)
        if outcome is None:
            return
        if outcome.unexpected is not None:
            self.m.log.warning("kvroom.unexpected_input", room=room.id, detail=str(outcome.unexpected))
        fire_actions(self.m.table, room, outcome, self.m.clock())  # a prefill verdict sends nothing
        if self.commits and threading.current_thread() is self.m.worker:
            self.send_commits()  # the Success it took, now that the room's lock is released
