"""The prefill (sender) side of a manager: serves decode peers, WRITEs pages.

Per-room state lives in stores registered with the room table
(``transfer_infos``, ``decode_prefix_lens``, ``send_plans``, ``xfer_handles``).
Three things deliberately outlive a room, each bounded:

* ``pending``: transfer info that arrived before the scheduler created the
  room (decode is often faster).  It is not a room: a remote message never
  creates one.  Capped in count and age; evicted entries are answered FAILED.
* draining transfers of a failed room: NIXL cannot cancel a WRITE, so its
  handle is polled until DONE (or the peer is lost) and released, and only then
  is the decode side told ``failed``: decode frees its pages on that word.
* tombstones of failed rooms, so late transfer info for them is answered at once
  (:mod:`kvroom.node.tombstones`; an abort's tombstone holds only for its sender).

Who may act on a room (the decode *principal*: its authenticated CURVE key
with ``ManagerConfig.keys``, else its agent name): a room is bound to the
decode ranks whose page lists it took.  An abort, vote, commit or page list
for a room bound to another principal is ignored, logged
(``kvroom.foreign_room_message``) and counted; a page list is also answered
FAILED so its sender does not wait.  A room still waiting for page lists may
take more ranks: with keys only ranks of a principal already bound (or the
first), without keys any (as the rank count cannot be checked otherwise).  With
keys, an abort for a room no rank bound yet is held against its sender only:
that sender's page list for it is refused later.

A room is bound to every decode rank (``infos_needed`` of them: decode's TP
x PP size, or the sender's ``required_dst_info_num``).  What this rank writes
into each decode rank is the planner's (:mod:`kvroom.planning`): a route bound
once per decode peer at the handshake, then :func:`~kvroom.planning.align_chunk`
and the route's plan per chunk (:mod:`kvroom.node.shares`); a rank the assignment
gives nothing only sends the bare end of its share.  That write path (chunks,
the outbox, posting, completions, NIXL faults) is
:class:`~kvroom.node.prefill_writes.PrefillWrites`; this module keeps peers, room
messages and verdicts.  Its verdict follows
:mod:`kvroom.protocol`: prefill rank 0 (TP rank 0 of PP stage 0: the coordinator) reaches Success once
its WRITEs completed and every decode rank voted READY, and tells them COMMIT;
another prefill rank reaches Success on the commit a decode rank relays.
Every protocol input goes through :meth:`PrefillSide.react`.
"""

from __future__ import annotations

import collections
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from kvroom.errors import (
    IncompatiblePeerError,
    PeerLostError,
    ProtocolError,
    RemoteFailureError,
    RequestMismatchError,
)
from kvroom.fsm import Event, KVPoll, RoomStore, TransitionRecord
from kvroom.fsm.room import Room
from kvroom.node.outbox import Outbox
from kvroom.node.prefill_writes import PrefillWrites
from kvroom.node.tombstones import Tombstones
from kvroom.planning import RankRegions, route, stage_entries
from kvroom.protocol import Input, Outcome, PrefillVerdict
from kvroom.protocol.verdicts import Verdicts, fire_actions
from kvroom.transport.auth import ServerAuth
from kvroom.transport.codec import Message
from kvroom.transport.control import ControlServer
from kvroom.transport.descriptors import IntArray, validate_pages
from kvroom.transport.faults import classify, for_room
from kvroom.transport.nixl import Transfer
from kvroom.transport.notif import Notif, notif_message, parse_notif
from kvroom.transport.staging import chunk_pages

if TYPE_CHECKING:
    from kvroom.node.host import NodeHost

from kvroom.node.prefill_state import DecodePeer, SendPlan, TransferInfo

__all__ = ["Notif", "PrefillSide", "SendPlan", "TransferInfo", "notif_message", "parse_notif"]


class PrefillSide(PrefillWrites):
    """Everything the prefill manager's worker does."""

    def __init__(self, manager: NodeHost, port: int) -> None:
        self.m = manager
        cfg = manager.config
        self.auth = ServerAuth(manager.zmq_context, cfg.keys) if cfg.keys is not None else None
        try:
            self.server = ControlServer(manager.zmq_context, cfg.host, port, cfg.max_message_bytes, self.auth)
        except BaseException:
            if self.auth is not None:
                self.auth.close()
            raise
        self.address = self.server.address
        self.foreign = 0  # room messages from peers the room is not bound to (ignored)
        self.unauthenticated = 0  # frames without the authenticated key we expect (dropped)
        table = manager.table
        self.send_plans: RoomStore[SendPlan] = table.register_store(RoomStore("send_plans"))
        self.handles: RoomStore[list[Transfer]] = table.register_store(RoomStore("xfer_handles"))
        # required_dst_info_num a sender declared (else decode's rank count decides)
        self.dst_counts: RoomStore[int] = table.register_store(RoomStore("dst_info_nums"))
        # the request each room was created for (KVSender(fingerprint=)): decode's must match
        self.fingerprints: RoomStore[str] = table.register_store(RoomStore("fingerprints"))
        self.verdicts: Verdicts[PrefillVerdict] = table.register_store(
            Verdicts(lambda room: PrefillVerdict(room.id, self.coordinator))
        )
        mine = manager.regions.layout  # TP rank 0 of PP stage 0 decides every room's verdict
        self.coordinator = mine.tp_rank == 0 and mine.pp_rank == 0
        self.peers: dict[bytes, DecodePeer] = {}
        self.by_agent: dict[str, DecodePeer] = {}
        # room id -> [(identity, message, arrival)]: info for rooms not created yet
        self.pending: collections.OrderedDict[int, list[tuple[bytes, Message, float]]] = (
            collections.OrderedDict()
        )
        self.tombstones = Tombstones(cfg.pending_limit, cfg.pending_ttl)
        # rooms whose decode left while its page list waited for the room (it aborted, or named
        # another request: orphans; it was lost: lost): without keys such a room fails as it
        # opens instead of holding its pages to a deadline
        self.orphans = Tombstones(cfg.pending_limit, cfg.pending_ttl)
        self.lost = Tombstones(cfg.pending_limit, cfg.pending_ttl)
        self.active: list[Transfer] = []
        self.outbox = Outbox()  # WRITEs planned this worker turn, posted joined at its end (flush)
        self.draining: dict[int, tuple[tuple[str, ...], str, list[Transfer]]] = {}

    # -- worker loop hooks ------------------------------------------------------

    def register(self, poller: zmq.Poller) -> None:
        """Make sure the poller watches our socket."""
        if self.server.socket not in dict(poller.sockets):
            poller.register(self.server.socket, zmq.POLLIN)

    def busy(self) -> bool:
        """True while transfers are in flight (poll NIXL without sleeping)."""
        return bool(self.active)

    def step(self, ready: dict[Any, int], now: float) -> None:
        """Handle messages, poll transfers, send heartbeat verdicts."""
        cfg = self.m.config  # first, before any NIXL progress: a stall changes whom we trust
        paused = self.m.stall.pause  # our own stall is not our peers' silence
        if paused:
            for peer in self.peers.values():
                peer.last_seen = max(peer.last_seen, min(now, peer.last_seen + paused))
        if paused >= cfg.stall_threshold:  # a decode rank may have given up on us: trust none
            reason = f"this prefill stalled for {paused:.1f} s; its decode peers may have declared it lost"
            for peer in list(self.peers.values()):
                self.peer_lost(peer, PeerLostError(reason), now)
        self.flush()  # the WRITEs this turn's commands planned
        refused = self.server.count_refusals()
        if refused:
            self.m.log.warning("kvroom.handshakes_refused", count=refused, total=self.server.refused)
        for _ in range(256):
            got = self.server.recv()
            if got is None:
                break
            self._on_message(got[0], got[2], now, got[1])
        if self.active:
            self._poll_transfers(now)
        try:
            self.m.agent.progress()  # bare notifications (ends of shares) go out only with progress
        except Exception as exc:
            if classify(exc, "progress") is None:
                raise
        if self.draining:
            self._poll_draining()
        cfg = self.m.config
        timeout = cfg.heartbeat_timeout
        for peer in [p for p in self.peers.values() if now - p.last_seen > timeout]:
            self.peer_lost(
                peer, PeerLostError(f"decode {peer.agent} silent for {now - peer.last_seen:.1f} s"), now
            )

    def expire(self, now: float) -> None:
        """Room deadlines (by the protocol table), and the age limits of pending info and tombstones."""
        for room, state, reason in self.m.table.take_due(now):
            self.react(room, Input.DEADLINE, reason=reason, state=state)
        while self.pending:
            room_id, entries = next(iter(self.pending.items()))
            if now - entries[0][2] <= self.m.config.pending_ttl:
                break
            del self.pending[room_id]
            for identity, _msg, _born in entries:
                self._send_failed(identity, room_id, "no prefill request with this room id")
        self.tombstones.expire(now)
        self.orphans.expire(now)
        self.lost.expire(now)

    def snapshot(self) -> dict[str, Any]:
        """Operator counters."""
        return {
            "bootstrap_addr": self.address,
            "peers": sorted(p.agent for p in self.peers.values()),
            "pending_infos": len(self.pending),
            "in_flight": len(self.active),
            "draining_rooms": len(self.draining),
            "tombstones": len(self.tombstones),
            "auth": "curve" if self.auth is not None else "none",
            "refused_handshakes": self.server.refused,
            "unknown_keys": self.auth.admit.unknown_keys if self.auth is not None else 0,
            "unauthenticated_frames": self.unauthenticated,
            "foreign_room_messages": self.foreign,
        }

    def close(self) -> None:
        """Release every handle and close the socket."""
        for t in self.active:
            self.m.agent.release(t)
        self.active.clear()
        self.server.close()
        if self.auth is not None:
            self.auth.close()

    # -- room lifecycle (called from the manager / sender) -----------------------

    def adopt_pending(self, room: Room) -> None:
        """Worker: apply transfer info that arrived before the room existed.

        A room whose decode left while its page list waited (an orphan) fails now, unless a
        page list of another decode principal waits for it too.
        """
        entries = self.pending.pop(room.id, [])
        orphan, lost = self.orphans.pop(room.id, None), self.lost.pop(room.id, None)
        left = orphan or lost
        if left is not None and self.auth is None:
            waiting = {self.peers[e[0]].principal for e in entries if e[0] in self.peers}
            gone: frozenset[str] = frozenset().union(*(t[2] or () for t in (orphan, lost) if t is not None))
            if waiting <= gone:
                for identity, _msg, _born in entries:
                    self._send_failed(identity, room.id, left[0])
                error = RemoteFailureError(left[0]) if orphan is not None else PeerLostError(left[0])
                self.m.fire(room, Event.REMOTE_ABORT, error=error)
                return
        for identity, msg, _born in entries:
            peer = self.peers.get(identity)
            if peer is None and self.auth is not None:
                continue  # it left (and its pending infos with it): nothing to authenticate against
            self._on_message(identity, msg, self.m.clock(), peer.principal if peer is not None else None)

    def on_transition(self, record: TransitionRecord) -> None:
        """Observer hook (room lock held): tell the decode ranks the verdict.

        The coordinator's Success is the commit; any rank's Failed is told once
        none of its WRITEs can still land.
        """
        if record.dst is KVPoll.Success and self.coordinator and record.src is not KVPoll.Success:
            room = self.m.table.get(record.room)
            if room is not None:
                peers = room.peers
                if threading.current_thread() is self.m.worker:  # the usual case: a vote or a DONE
                    self._send_commit(record.room, peers)  # now, not a loop turn later
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

    def peer_lost(self, peer: DecodePeer, error: PeerLostError, now: float) -> None:
        """Fail exactly the rooms bound to ``peer``; forget it and its handles."""
        if self.peers.get(peer.identity) is not peer:
            return
        del self.peers[peer.identity]
        self.by_agent.pop(peer.agent, None)
        self.m.log.warning("kvroom.peer_lost", peer=peer.agent, reason=str(error))
        for room in self.m.table.live_rooms():
            if peer.agent in room.peers:
                left = sum(1 for a in room.peers if a in self.by_agent)
                mine = for_room(error, room.id, f"decode peer {peer.agent} lost")
                self.react(room, Input.PEER_LOST, peer.agent, reason=str(mine), error=mine, ranks_left=left)
        self.outbox.drop(peer.agent)
        for t in self.active:
            if t.peer == peer.agent:
                self.m.agent.release(t)
        self.active = [t for t in self.active if not t.released]
        for room_id, (agents, reason, transfers) in list(self.draining.items()):
            if peer.agent in agents:
                self.draining[room_id] = (tuple(a for a in agents if a != peer.agent), reason, transfers)
        for room_id, entries in list(self.pending.items()):
            kept = [e for e in entries if e[0] != peer.identity]
            if len(kept) < len(entries):
                reason = str(for_room(error, room_id, f"decode peer {peer.agent} lost"))
                self.lost.add(room_id, reason, now, peer.principal)
            if kept:
                self.pending[room_id] = kept
            else:
                del self.pending[room_id]
        self.m.agent.remove_remote(peer.agent)

    # -- control messages -------------------------------------------------------

    def _may_act(self, room: Room, peer: DecodePeer) -> bool:
        """Whether ``peer`` may act on ``room``: bound to it, or a rank the room may still take."""
        if peer.agent in room.peers:
            return True
        if self.auth is None:  # no identity beyond the agent: any rank may still join
            return room.state is KVPoll.Bootstrapping
        bound = {self.by_agent[a].principal for a in room.peers if a in self.by_agent}
        return peer.principal in bound and room.state is KVPoll.Bootstrapping

    def _foreign(self, peer: DecodePeer, kind: str, room_id: int) -> None:
        """Log and count a message about a room bound to someone else; nothing else happens."""
        self.foreign += 1
        self.m.log.warning(
            "kvroom.foreign_room_message",
            peer=peer.agent,
            principal=peer.principal,
            message=kind,
            room=room_id,
        )

    def _on_message(
        self, identity: bytes, msg: Message | ProtocolError, now: float, user: str | None = None
    ) -> None:
        peer = self.peers.get(identity)
        if self.auth is not None and (user is None or (peer is not None and peer.principal != user)):
            self.unauthenticated += 1  # never for a CURVE socket; kept as a second line of defence
            self.m.log.warning("kvroom.unauthenticated_frame", identity=identity.hex(), user=user)
            return
        if isinstance(msg, ProtocolError):
            self.m.log.warning(
                "kvroom.bad_frame", peer=peer.agent if peer else identity.hex(), error=str(msg)
            )
            return
        if msg.type == "hello":
            self._on_hello(identity, msg, now, user)
            return
        if peer is None:  # room traffic only from peers that completed the handshake
            self.server.send(identity, "unknown")  # e.g. one we declared lost while it was stalled
            return
        peer.last_seen = now
        if msg.type == "ping":
            self.server.send(identity, "pong")
        elif msg.type == "room":
            self._on_room(peer, identity, msg, now)
        elif msg.type == "abort":
            self._on_abort(peer, msg, now)
        elif msg.type in ("ready", "commit"):
            room = self.m.table.get(msg.fields["room"])
            if room is not None and peer.agent in room.peers:
                self.react(room, Input.READY if msg.type == "ready" else Input.COMMIT, peer.agent)
            elif room is not None:
                self._foreign(peer, msg.type, room.id)

    def _on_hello(self, identity: bytes, msg: Message, now: float, user: str | None) -> None:
        agent = msg.fields["agent"]
        principal = user if user is not None else agent
        old = self.peers.get(identity) or self.by_agent.get(agent)
        # with keys an agent name is no credential: another key may not take it over
        if self.auth is not None and old is not None and old.principal != principal:
            self.m.log.warning("kvroom.peer_rejected", peer=agent, reason="agent name of another key")
            self.server.send(identity, "reject", {"reason": f"agent {agent} belongs to another peer"})
            return
        try:
            rank = RankRegions.from_dict(msg.fields["rank"])
            self.m.regions.check_compatible(rank, agent)
            pair = route(self.m.regions, rank, stage_entries(rank.layout, self.m.regions.layout))
        except (ValueError, IncompatiblePeerError) as exc:
            self.m.log.warning("kvroom.peer_rejected", peer=agent, reason=str(exc))
            self.server.send(identity, "reject", {"reason": str(exc)[:2000]})
            return
        old = self.peers.get(identity) or self.by_agent.get(agent)
        if old is not None:
            self.peer_lost(old, PeerLostError(f"decode {old.agent} said hello again"), now)
        try:
            name = self.m.agent.add_remote(msg.payload)
        except Exception as exc:
            if classify(exc, "add_remote_agent") is None:
                raise
            self.server.send(identity, "reject", {"reason": f"bad agent metadata: {exc}"[:2000]})
            return
        if name != agent:
            self.m.agent.remove_remote(name)
            self.server.send(
                identity, "reject", {"reason": f"metadata names agent {name}, hello said {agent}"}
            )
            return
        staging = (msg.fields["staging_base"], msg.fields["staging_bytes"])
        peer = DecodePeer(identity, agent, principal, rank, pair, staging, now)
        self.peers[identity] = peer
        self.by_agent[agent] = peer
        fields = {"agent": self.m.agent_name, "rank": self.m.regions.layout.to_dict()}
        self.server.send(identity, "welcome", fields, self.m.agent.metadata())
        self.m.log.info("kvroom.peer_joined", peer=agent, principal=principal)

    def _on_room(self, peer: DecodePeer, identity: bytes, msg: Message, now: float) -> None:
        room_id = msg.fields["room"]
        info_or_reason = self._parse_info(peer, msg)
        if isinstance(info_or_reason, str):
            self._send_failed(identity, room_id, info_or_reason)
            return
        info = info_or_reason
        room = self.m.table.get(room_id)
        held = (
            self.tombstones.reason_for(room_id, peer.principal, held_only=True) if room is not None else None
        )
        if room is not None and held is not None and peer.agent not in room.peers:
            # its own abort arrived before anyone bound the room: the abort applies now
            self.react(room, Input.ABORT, peer.agent, reason=held, error=RemoteFailureError(held))
            self._send_failed(identity, room_id, held)
            return
        if room is not None and room.peers and not self._may_act(room, peer):
            self._foreign(peer, "room", room_id)
            self._send_failed(identity, room_id, f"room {room_id} is bound to another decode peer")
            return
        if room is None:
            tomb = self.tombstones.reason_for(room_id, peer.principal)
            if tomb is not None:
                self._send_failed(identity, room_id, tomb)
                return
            self.pending.setdefault(room_id, []).append((identity, msg, now))
            self.pending.move_to_end(room_id)
            while len(self.pending) > self.m.config.pending_limit:
                old_id, entries = self.pending.popitem(last=False)
                for old_ident, _, _ in entries:
                    self._send_failed(old_ident, old_id, "prefill pending-room limit reached")
            return
        ranks = peer.ranks
        with room.lock:
            if not room.live or room.state is not KVPoll.Bootstrapping or peer.agent in room.peers:
                return  # late or duplicate info: nothing changes
            infos: dict[str, TransferInfo] = self.m.table.transfer_infos.get(room.id) or {}
            room.peers = (*room.peers, peer.agent)
            infos = {**infos, peer.agent: info}
            self.m.table.transfer_infos.put_locked(room, infos)
            self.m.table.decode_prefix_lens.put_locked(room, info.prefix_pages)
            conflict = self._conflict(room, infos, ranks)
            mismatch = self._mismatch(room, info)
        if mismatch is not None:  # and the id stays dead for that decode: a room opened on it later fails
            self.orphans.add(room.id, str(mismatch), now, peer.principal)
            self.m.fire(room, Event.REMOTE_ABORT, error=mismatch)
            return
        if conflict is not None:
            self.m.fire(room, Event.REMOTE_ABORT, error=RemoteFailureError(f"room {room.id}: {conflict}"))
            return
        plan = self.send_plans.get(room.id)
        if plan is not None and not self._plan_fits(room, plan, info):
            return
        self.m.table.fire(room, Event.DST_INFO, now, infos=1)

    def _conflict(self, room: Room, infos: dict[str, TransferInfo], ranks: int) -> str | None:
        """Room lock held: decode ranks must agree on their count and the prefix."""
        declared = self.dst_counts.get(room.id)
        if declared is not None and declared != ranks:
            return f"the sender expects {declared} decode ranks, decode runs {ranks}"
        if room.infos_needed != ranks:
            if room.infos_got or len(infos) > 1:
                return f"decode ranks disagree on their count ({room.infos_needed} vs {ranks})"
            room.infos_needed = ranks
        if len({i.prefix_pages for i in infos.values()}) > 1:
            return "decode ranks sent different prefix lengths"
        return None

    def _mismatch(self, room: Room, info: TransferInfo) -> RequestMismatchError | None:
        """Room lock held: decode's request differs from the one this room was created for."""
        mine = self.fingerprints.get(room.id)
        if mine is None or info.fingerprint is None or mine == info.fingerprint:
            return None
        return RequestMismatchError(
            f"room {room.id}: decode {info.peer} expects request {info.fingerprint}, "
            f"but prefill holds request {mine} under this room id"
        )

    def _parse_info(self, peer: DecodePeer, msg: Message) -> TransferInfo | str:
        """A room message as transfer info, or the reason it is refused."""
        f, rank, what = msg.fields, peer.rank, f"room {msg.fields['room']}"
        pages = np.frombuffer(msg.payload, dtype="<i8").astype(np.int64)
        state: dict[str, IntArray] = {}
        try:
            validate_pages(pages, rank.items("kv") or 0, what)
            for space, rows in (f["state"] or {}).items():
                state[space] = validate_pages(rows, rank.items(space) or 0, f"{what} state {space!r}")
        except (TypeError, ValueError) as exc:
            return str(exc)
        aux, aux_rows = f["aux_index"], rank.items("aux") or 0
        if aux is not None and not 0 <= aux < aux_rows:
            return f"aux index {aux} out of range for {aux_rows} slots"
        writes = not peer.route.empty
        if not writes and (pages.size or aux is not None or f["staging"] or state):
            mine = self.m.regions.layout
            return f"{what}: prefill rank tp {mine.tp_rank} pp {mine.pp_rank} writes nothing into this rank"
        staging, tensors = f["staging"], self.m.tensors
        if staging is not None:
            if tensors is None:
                return f"{what}: this prefill has no tensor pool to stage from"
            size, unit, lay = f["chunk_pages"], tensors.staging_unit_bytes, tensors.layout
            for c, offset in enumerate(staging):
                units = chunk_pages(int(pages.size), size, c) * lay.kv_heads * lay.layers
                if (offset + units) * unit > peer.staging[1]:
                    return f"{what}: staging chunk {c} lies outside decode's staging buffer"
            staging = tuple(staging)
        fingerprint = f["fingerprint"]
        return TransferInfo(
            peer.agent, pages, aux, f["prefix_pages"], staging, f["chunk_pages"], state, writes, fingerprint
        )

    def _plan_fits(self, room: Room, plan: SendPlan, info: TransferInfo) -> bool:
        """A rank's page count must equal prefill's pages after the prefix (0 for watchers)."""
        expected = plan.num_pages - info.prefix_pages if info.writes else 0
        if expected == info.pages.size and info.prefix_pages <= plan.num_pages:
            return True
        error = RemoteFailureError(
            f"room {room.id}: decode {info.peer} sent {info.pages.size} pages after a "
            f"{info.prefix_pages}-page prefix, but prefill has {plan.num_pages} pages"
        )
        self.m.fire(room, Event.REMOTE_ABORT, error=error)
        return False

    def check_plan(self, room: Room) -> None:
        """Worker, after ``init()``: validate info that arrived before it."""
        infos: dict[str, TransferInfo] | None = self.m.table.transfer_infos.get(room.id)
        plan = self.send_plans.get(room.id)
        if infos is not None and plan is not None:
            for info in infos.values():
                if not self._plan_fits(room, plan, info):
                    return

    def _on_abort(self, peer: DecodePeer, msg: Message, now: float) -> None:
        room_id, reason = msg.fields["room"], f"aborted by decode: {msg.fields['reason']}"
        room = self.m.table.get(room_id)
        if room is not None and self.auth is not None and not room.peers:
            self.tombstones.add(room_id, reason, now, peer.principal)  # held until its page list
            self.m.log.info("kvroom.abort_held", peer=peer.agent, room=room_id)
        elif room is not None and not self._may_act(room, peer):
            self._foreign(peer, "abort", room_id)
            return
        elif room is not None:  # the failure notice follows once nothing is in flight
            self.react(room, Input.ABORT, peer.agent, reason=reason, error=RemoteFailureError(reason))
            if peer.agent in room.peers:
                return
        else:
            draining = self.draining.get(room_id)
            if draining is not None and peer.agent in draining[0]:
                return  # failed already: its FAILED follows once no WRITE of it can land
            waiting = self.pending.pop(room_id, [])
            entries = [e for e in waiting if e[0] != peer.identity]
            if entries:
                self.pending[room_id] = entries
            if len(entries) < len(waiting):  # its page list waited: the room, once opened, has no decode
                self.orphans.add(room_id, reason, now, peer.principal)
            self.tombstones.add(room_id, reason, now, peer.principal)
        self._send_failed(peer.identity, room_id, reason)
