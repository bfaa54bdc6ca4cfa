"""The prefill (sender) side of a manager: serves decode peers, WRITEs pages.

:class:`PrefillSide` is the worker's view of prefill: it owns the control
socket, runs one loop turn (:meth:`PrefillSide.step`: post the WRITEs the
turn planned, read messages, poll transfers, heartbeats) and the deadlines
(:meth:`PrefillSide.expire`), and routes each message to the part that handles
it.  The parts, each a module:

* :mod:`kvroom.node.prefill_peers`: the handshake and losing a peer;
* :mod:`kvroom.node.prefill_rooms`: page lists and aborts, and who may act on a room;
* :mod:`kvroom.node.prefill_writes`: chunks to WRITEs, the outbox, completions, NIXL faults;
* :mod:`kvroom.node.prefill_verdicts`: the state they share and the protocol verdict.

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

A room is bound to every decode rank (``infos_needed`` of them: decode's TP
x PP size, or the sender's ``required_dst_info_num``).  What this rank writes
into each decode rank is the planner's (:mod:`kvroom.planning`): a route bound
once per decode peer at the handshake, then :func:`~kvroom.planning.align_chunk`
and the route's plan per chunk (:mod:`kvroom.node.shares`); a rank the assignment
gives nothing only sends the bare end of its share.  Its verdict follows
:mod:`kvroom.protocol`: prefill rank 0 (the coordinator) reaches Success once
its WRITEs completed and every decode rank voted READY, and tells them COMMIT;
another prefill rank reaches Success on the commit a decode rank relays.
Every protocol input goes through :meth:`PrefillSide.react`.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

import zmq

from kvroom.errors import (
    PeerLostError,
    ProtocolError,
)
from kvroom.fsm import RoomStore
from kvroom.node.outbox import Outbox
from kvroom.node.prefill_peers import PrefillPeers
from kvroom.node.prefill_rooms import PrefillRooms
from kvroom.node.prefill_state import SendPlan, TransferInfo
from kvroom.node.prefill_writes import PrefillWrites
from kvroom.node.tombstones import Forgone, Tombstones
from kvroom.protocol import Input, PrefillVerdict
from kvroom.protocol.verdicts import Verdicts
from kvroom.transport.auth import ServerAuth
from kvroom.transport.codec import Message
from kvroom.transport.control import ControlServer
from kvroom.transport.notif import Notif, notif_message, parse_notif

if TYPE_CHECKING:
    from kvroom.node.host import NodeHost

__all__ = ["Notif", "PrefillSide", "SendPlan", "TransferInfo", "notif_message", "parse_notif"]


class PrefillSide(PrefillRooms, PrefillPeers, PrefillWrites):
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
        self.send_plans = table.register_store(RoomStore("send_plans"))
        self.handles = table.register_store(RoomStore("xfer_handles"))
        # required_dst_info_num a sender declared (else decode's rank count decides)
        self.dst_counts = table.register_store(RoomStore("dst_info_nums"))
        # the request each room was created for (KVSender(fingerprint=)): decode's must match
        self.fingerprints = table.register_store(RoomStore("fingerprints"))
        self.verdicts = table.register_store(Verdicts(lambda room: PrefillVerdict(room.id, self.coordinator)))
        mine = manager.regions.layout  # TP rank 0 of PP stage 0 decides every room's verdict
        self.coordinator = mine.tp_rank == 0 and mine.pp_rank == 0
        self.peers = {}
        self.by_agent = {}
        # room id -> [(identity, message, arrival)]: info for rooms not created yet
        self.pending = collections.OrderedDict()
        self.tombstones = Tombstones(cfg.pending_limit, cfg.pending_ttl)
        # rooms whose decode left while its page list waited for the room (it aborted, or named
        # another request: orphans; it was lost: lost): without keys such a room fails as it
        # opens instead of holding its pages to a deadline
        self.orphans = Tombstones(cfg.pending_limit, cfg.pending_ttl)
        self.lost = Tombstones(cfg.pending_limit, cfg.pending_ttl)
        self.forgone = Forgone(cfg.pending_limit, cfg.pending_ttl)
        self.active = []
        self.outbox = Outbox()  # WRITEs planned this worker turn, posted joined at its end (flush)
        self.draining = {}
        self.commits = collections.deque()

    # -- worker loop hooks ------------------------------------------------------

    def register(self, poller: zmq.Poller) -> None:
        """Make sure the poller watches our socket."""
        if self.server.socket not in dict(poller.sockets):
            poller.register(self.server.socket, zmq.POLLIN)

    def tick(self) -> float | None:
        """While transfers are in flight, how often to poll NIXL for their ends; None when none is."""
        return self.m.config.busy_poll_interval if self.active else None

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
        self.send_commits()  # any a command's Success decided (react sends them itself)
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
        self.send_commits()  # a DONE above took Success (outside react): its COMMIT goes now
        self.m.agent.progress()  # NIXL moves its backend only inside its calls: between transfers too
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
        self.forgone.expire(now)

    def snapshot(self) -> dict[str, Any]:
        """Operator counters."""
        return {
            "bootstrap_addr": self.address,
            "peers": sorted(p.agent for p in self.peers.values()),
            "pending_infos": len(self.pending),
            "in_flight": len(self.active),
            "draining_rooms": len(self.draining),
            "tombstones": len(self.tombstones),
            "forgone_rooms": len(self.forgone),  # (room, request) pairs decode said it will not ask for
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
