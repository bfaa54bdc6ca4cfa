"""The decode (receiver) side of a manager: handshakes, page lists, arrivals.

A room is bound to every prefill rank (one bootstrap address each, stage-major
as :func:`~kvroom.planning.group_ranks` orders them: the first is TP rank 0 of
PP stage 0, the coordinator).  The ranks the planner's assignment gives a part
of our buffers are its *sources* and write into our regions (or, for a tensor
pool, into the staging ring, then scattered here); the others only watch, so
that a failure on any rank of either side reaches every rank.

A decode room may only become Failed once no WRITE for it can still land in
its pages, so the scheduler can reuse them at once, and it reaches Success only
on the coordinator's COMMIT (prefill rank 0), after voting READY once every
byte is in place.  Which input does what in which phase is the table of
:mod:`kvroom.protocol.spec`; :meth:`DecodeSide.react` carries it out.

:class:`DecodeSide` is the worker's view of decode: one loop turn
(:meth:`DecodeSide.step`: messages, NIXL progress, heartbeats, rooms
waiting for staging space), the deadlines, the handshake's answers and losing
a peer.  Its parts, each a module:

* :mod:`kvroom.node.decode_rooms`: page lists out, arrivals in;
* :mod:`kvroom.node.decode_staging`: the staging ring's reservations, prefetch, the scatter;
* :mod:`kvroom.node.decode_verdicts`: the state they share and the protocol verdict.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import zmq

from kvroom.errors import (
    IncompatiblePeerError,
    PeerLostError,
    ProtocolError,
    RemoteFailureError,
)
from kvroom.fsm import RoomStore
from kvroom.node.decode_rooms import DecodeRooms
from kvroom.node.shares import kv_heads
from kvroom.planning import RankLayout
from kvroom.protocol import DecodeVerdict, Input, Msg
from kvroom.protocol.verdicts import Verdicts
from kvroom.transport.codec import Message
from kvroom.transport.faults import bounded, classify, for_room
from kvroom.transport.layout import range_overlap
from kvroom.transport.staging import StagingStore

if TYPE_CHECKING:
    from kvroom.node.host import NodeHost

from kvroom.node.decode_state import PrefillPeer, ReceivePlan

__all__ = ["DecodeSide", "ReceivePlan"]


class DecodeSide(DecodeRooms):
    """Everything the decode manager's worker does."""

    def __init__(self, manager: NodeHost) -> None:
        self.m = manager
        table = manager.table
        self.plans = table.register_store(RoomStore("receive_plans"))
        self.verdicts = table.register_store(Verdicts(lambda room: DecodeVerdict(room.id, room.peers)))
        # rooms failing once their sources confirm: since when (bounded by 2 x heartbeat timeout)
        self.failing_since = table.register_store(RoomStore("failing_since"))
        assert isinstance(table.prefetch_requested, StagingStore) and table.prefetched_rooms is not None
        self.staging = table.prefetch_requested
        self.prefetched = table.prefetched_rooms
        self.ring = self.staging.ring
        self.peers = {}
        self.by_agent = {}
        self._registered = set()
        self._shares = {}
        self.waiting_staging = []  # rooms whose page list waits for ring space
        # staging reserved for rooms not created yet: room id -> (reservations, pages, expiry)
        self._early = {}
        self._early_lock = threading.Lock()
        tensors = manager.tensors
        self._views = [tensors.page_view(i) for i in range(tensors.layout.layers)] if tensors else []

    # -- worker loop hooks ------------------------------------------------------

    def register(self, poller: zmq.Poller) -> None:
        """Watch every peer's socket (and stop watching closed ones)."""
        live = {p.client.socket for p in self.peers.values()}
        for sock in self._registered - live:
            poller.unregister(sock)
        for sock in live - self._registered:
            poller.register(sock, zmq.POLLIN)
        self._registered = live

    def tick(self) -> float | None:
        """While rooms hold page lists, how often to drive NIXL's progress (UCX over TCP moves
        bytes into them only as we poll); None when none waits."""
        return self.m.config.target_poll_interval if self.plans else None

    def step(self, ready: dict[Any, int], now: float) -> None:
        """Messages (WRITTEN among them), NIXL progress, heartbeats, rooms waiting for staging space."""
        for peer in list(self.peers.values()):
            if peer.agent is None and peer.client.refused():
                refused = IncompatiblePeerError(
                    f"prefill at {peer.address} refused our CURVE key: add this decode's public key "
                    "to its trusted keys"
                )
                self._drop_peer(peer, refused, now)
                continue
            for _ in range(256):
                msg = peer.client.recv()
                if msg is None:
                    break
                self._on_message(peer, msg, now)
                if self.peers.get(peer.address) is not peer:
                    break
        self.m.agent.progress()  # drives NIXL (UCX over TCP needs it); WRITTEN says what landed
        if self.waiting_staging:
            waiting, self.waiting_staging = self.waiting_staging, []
            for room in waiting:
                self.send_room(room)
        cfg = self.m.config
        paused = self.m.stall.pause  # our own stall is not our peers' silence
        for peer in list(self.peers.values()):
            peer.last_heard = max(peer.last_heard, min(now, peer.last_heard + paused))
            if now - peer.last_ping >= cfg.heartbeat_interval:
                peer.client.send("ping")
                peer.last_ping = now
            silent = now - peer.last_heard
            if silent > cfg.heartbeat_timeout:
                what = "went silent"
                if peer.agent is None:
                    keyed = " (or refused our key, or has another key)" if cfg.keys is not None else ""
                    what = f"did not answer{keyed}"
                self.peer_lost(
                    peer, PeerLostError(f"prefill at {peer.address} {what} for {silent:.1f} s"), now
                )

    def expire(self, now: float) -> None:
        """Deadlines, by the protocol table; failures whose confirmations are overdue."""
        table = self.m.table
        for room, state, reason in table.take_due(now):
            self.react(room, Input.DEADLINE, reason=reason, state=state)
        overdue = 2 * self.m.config.heartbeat_timeout
        for room_id in self.failing_since:  # only rooms waiting for a confirmation
            since = self.failing_since.get(room_id)
            waiting = table.get(room_id)
            verdict = self.verdicts.get(room_id)
            failure = verdict.overdue() if verdict is not None else None
            if waiting is not None and since is not None and failure is not None and now - since > overdue:
                reason = f"{failure.reason} (prefill did not confirm within {overdue:g} s)"
                table.fire(waiting, failure.event, now, error=failure.error, reason=reason)
        with self._early_lock:
            stale = [r for r, (_, _, expiry) in self._early.items() if expiry < now]
            for room_id in stale:
                for res in self._early.pop(room_id)[0].values():
                    self.ring.release(res)

    def snapshot(self) -> dict[str, Any]:
        """Operator counters."""
        return {
            "peers": sorted(p.address for p in self.peers.values() if p.agent),
            "staging_free": self.ring.free,
            "staging_capacity": self.ring.capacity,
            "early_prefetches": len(self._early),
        }

    def close(self) -> None:
        """Close every socket."""
        for peer in self.peers.values():
            peer.client.close()
        self.peers.clear()

    # -- inbound ------------------------------------------------------------------

    def _on_message(self, peer: PrefillPeer, msg: Message | ProtocolError, now: float) -> None:
        if isinstance(msg, ProtocolError):
            self.m.log.warning("kvroom.bad_frame", peer=peer.address, error=str(msg))
            return
        if msg.type == "welcome":
            self._on_welcome(peer, msg, now)
            return
        if msg.type == "reject":
            refused = IncompatiblePeerError(f"prefill at {peer.address} refused us: {msg.fields['reason']}")
            self._drop_peer(peer, refused, now)
            return
        if peer.agent is None:
            return  # nothing but welcome/reject before the handshake
        peer.last_heard = now
        if msg.type == "unknown":  # it declared us lost (we were stalled, or it restarted)
            error = PeerLostError(f"prefill at {peer.address} no longer knows this decode (declared it lost)")
            self.peer_lost(peer, error, now)
            return
        if msg.type == "written":
            self._on_written(peer, msg.payload, now)
            return
        room = self.m.table.get(msg.fields["room"]) if "room" in msg.fields else None
        if room is None or peer.address not in room.peers:
            return  # late word about a finished room, or not ours
        if msg.type == "failed":
            reason = bounded(f"prefill failed the room: {msg.fields['reason']} (rank at {peer.address})")
            self.react(room, Input.FAILED, peer.address, reason=reason, error=RemoteFailureError(reason))
        elif msg.type == "commit":
            self.react(room, Input.COMMIT, peer.address)

    def _on_welcome(self, peer: PrefillPeer, msg: Message, now: float) -> None:
        try:
            layout = RankLayout.from_dict(msg.fields["rank"])
            mine = self.m.regions.layout
            mine.model.check_compatible(layout.model, msg.fields["agent"])
            theirs, ours = kv_heads(layout), kv_heads(mine)
            overlap = theirs is not None and ours is not None and range_overlap(theirs, ours)
            if overlap and self._stages(theirs) and not self.ring.capacity:
                raise IncompatiblePeerError(
                    f"prefill rank {layout.tp_rank} of {layout.tp_size} needs the staging ring "
                    "(head slices interleave), but this decode pool has staging_pages=0"
                )
            name = self.m.agent.add_remote(msg.payload)
        except (ValueError, IncompatiblePeerError) as exc:
            self._drop_peer(peer, IncompatiblePeerError(str(exc)), now)
            return
        except Exception as exc:
            error = classify(exc, f"add_remote_agent for {peer.address}")
            if error is None:
                raise
            self._drop_peer(peer, error, now)
            return
        peer.agent = name
        peer.layout = layout
        peer.last_heard = now
        self.by_agent[name] = peer
        queued, peer.queued = peer.queued, []
        for room_id in queued:
            room = self.m.table.get(room_id)
            if room is not None:
                self.send_room(room)
        aborts, peer.aborts = peer.aborts, []
        for room_id, reason, fingerprint in aborts:  # rooms aborted while we greeted: prefill frees them
            fields: dict[str, Any] = {"room": room_id, "reason": reason}
            if fingerprint is not None:
                fields["fingerprint"] = fingerprint
            peer.client.send(Msg.ABORT.value, fields)

    def _drop_peer(self, peer: PrefillPeer, error: BaseException, now: float) -> None:
        if self.peers.get(peer.address) is not peer:
            return
        del self.peers[peer.address]
        if peer.agent is not None:
            self.by_agent.pop(peer.agent, None)
            self.m.agent.remove_remote(peer.agent)
        peer.client.close()
        self.m.log.warning("kvroom.peer_lost", peer=peer.address, reason=str(error))
        for room in self.m.table.live_rooms():
            if peer.address in room.peers:  # nothing more lands from it: the protocol decides
                mine = for_room(error, room.id, f"prefill peer {peer.address} lost")
                self.react(room, Input.PEER_LOST, peer.address, reason=str(mine), error=mine)

    def peer_lost(self, peer: PrefillPeer, error: BaseException, now: float) -> None:
        """Fail (by the protocol) every room bound to ``peer``; a later room re-handshakes."""
        self._drop_peer(peer, error, now)
