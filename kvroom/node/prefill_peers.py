"""Prefill's decode peers: the handshake, and losing a peer.

A decode rank says ``hello`` (its agent, layout, regions, staging ring and NIXL
metadata); :meth:`PrefillPeers._on_hello` checks it is compatible, binds the
planner's route for the pair once (:func:`~kvroom.planning.route`), loads its
agent and answers ``welcome`` with ours, or ``reject`` with the reason.  With
CURVE keys an agent name is no credential: another key may not take it over.
A peer that says hello again, falls silent past the heartbeat timeout, or
faults in NIXL is lost (:meth:`PrefillPeers.peer_lost`): exactly the rooms
bound to it fail, its queued WRITEs and handles go, and page lists it left
waiting are remembered (bounded) so their rooms fail as they open.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvroom.errors import IncompatiblePeerError, PeerLostError
from kvroom.node.prefill_state import DecodePeer
from kvroom.node.prefill_verdicts import PrefillVerdicts
from kvroom.planning import RankRegions, route, stage_entries
from kvroom.protocol import Input
from kvroom.transport.faults import classify, for_room

if TYPE_CHECKING:
    from kvroom.transport.codec import Message

__all__ = ["PrefillPeers"]


class PrefillPeers(PrefillVerdicts):
    """Handshakes and peer loss, for :class:`~kvroom.node.prefill.PrefillSide`."""

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
