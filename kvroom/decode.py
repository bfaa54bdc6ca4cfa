"""The decode (receiver) side of a manager: handshakes, page lists, arrivals.

A decode room may only become Failed once no WRITE for it can still land in
its pages, so the scheduler can reuse them at once.  Before its page list has
been sent that is always true.  After it, a local abort or deadline first asks
prefill to abort the room and waits for prefill's ``failed`` notice (sent only
when nothing is in flight), or for the prefill peer to be declared lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq

from kvroom.errors import IncompatiblePeerError, PeerLostError, ProtocolError, RemoteFailureError
from kvroom.fsm import Event, KVPoll, RoomStore, TransitionRecord
from kvroom.fsm.room import Room
from kvroom.prefill import parse_notif
from kvroom.transport.codec import Message
from kvroom.transport.control import ControlClient
from kvroom.transport.descriptors import IntArray
from kvroom.transport.faults import classify
from kvroom.transport.layout import KVLayout

if TYPE_CHECKING:
    from kvroom.manager import KVManager

__all__ = ["DecodeSide", "ReceivePlan"]


@dataclass
class PrefillPeer:
    """One prefill bootstrap address this decode talks to."""

    address: str
    client: ControlClient
    last_heard: float
    last_ping: float = 0.0
    agent: str | None = None  # set by welcome
    queued: list[int] = field(default_factory=list)  # rooms waiting for the handshake


@dataclass
class ReceivePlan:
    """What this room asked for: its pages, aux slot and prefix."""

    pages: IntArray
    aux_index: int | None
    prefix_pages: int
    seen: set[int] = field(default_factory=set)  # chunk sequence numbers arrived


@dataclass(frozen=True)
class PendingFailure:
    """A local failure waiting for prefill to confirm nothing is in flight."""

    event: Event
    reason: str
    since: float


class DecodeSide:
    """Everything the decode manager's worker does."""

    def __init__(self, manager: KVManager) -> None:
        self.m = manager
        table = manager.table
        self.plans: RoomStore[ReceivePlan] = table.register_store(RoomStore("receive_plans"))
        self.pending_failures: RoomStore[PendingFailure] = table.register_store(RoomStore("pending_failures"))
        self.peers: dict[str, PrefillPeer] = {}
        self.by_agent: dict[str, PrefillPeer] = {}
        self._registered: set[Any] = set()

    # -- worker loop hooks ------------------------------------------------------

    def register(self, poller: zmq.Poller) -> None:
        """Watch every peer's socket (and stop watching closed ones)."""
        live = {p.client.socket for p in self.peers.values()}
        for sock in self._registered - live:
            poller.unregister(sock)
        for sock in live - self._registered:
            poller.register(sock, zmq.POLLIN)
        self._registered = live

    def busy(self) -> bool:
        """Decode has no handles of its own; notifications are polled each step."""
        return False

    def step(self, ready: dict[Any, int], now: float) -> None:
        """Messages, notifications, heartbeats."""
        for peer in list(self.peers.values()):
            for _ in range(256):
                msg = peer.client.recv()
                if msg is None:
                    break
                self._on_message(peer, msg, now)
                if self.peers.get(peer.address) is not peer:
                    break
        self._drain_notifications(now)
        cfg = self.m.config
        for peer in list(self.peers.values()):
            if now - peer.last_ping >= cfg.heartbeat_interval:
                peer.client.send("ping")
                peer.last_ping = now
            silent = now - peer.last_heard
            if silent > cfg.heartbeat_timeout:
                what = "did not answer" if peer.agent is None else "went silent"
                self.peer_lost(
                    peer, PeerLostError(f"prefill at {peer.address} {what} for {silent:.1f} s"), now
                )

    def expire(self, now: float) -> None:
        """Deadlines: fail at once where no write can land, else ask prefill first."""
        table = self.m.table
        for room, state, reason in table.take_due(now):
            if state is KVPoll.Bootstrapping:
                table.fail_if_in(room, state, Event.TIMEOUT, now, reason)
            else:
                self.fail_after_confirm(room, Event.TIMEOUT, reason)
        overdue = 2 * self.m.config.heartbeat_timeout
        for room in table.live_rooms():
            pending = self.pending_failures.get(room.id)
            if pending is not None and now - pending.since > overdue:
                reason = f"{pending.reason} (prefill did not confirm within {overdue:g} s)"
                table.fire(room, pending.event, now, reason=reason)

    def snapshot(self) -> dict[str, Any]:
        """Operator counters."""
        return {"peers": sorted(p.address for p in self.peers.values() if p.agent)}

    def close(self) -> None:
        """Close every socket."""
        for peer in self.peers.values():
            peer.client.close()
        self.peers.clear()

    def on_transition(self, record: TransitionRecord) -> None:
        """Observer hook: nothing to do on decode."""

    # -- commands from receivers --------------------------------------------------

    def connect(self, room: Room) -> None:
        """Worker: make sure the room's prefill peer exists and was greeted."""
        address = room.peer
        if address is None or not room.live or address in self.peers:
            return
        now = self.m.clock()
        try:
            client = ControlClient(self.m._ctx, address, self.m.config.max_message_bytes)
        except (ValueError, zmq.ZMQError) as exc:
            self.m.table.fire(
                room, Event.PEER_LOST, now, error=PeerLostError(f"bad bootstrap address: {exc}")
            )
            return
        peer = PrefillPeer(address, client, last_heard=now)
        self.peers[address] = peer
        pool = self.m.pool
        fields = {
            "agent": self.m.agent_name,
            "layout": pool.layout.to_dict(),
            "regions": pool.regions.to_dict(),
        }
        client.send("hello", fields, self.m.agent.metadata())

    def send_room(self, room: Room) -> None:
        """Worker: send the room's page list once the peer is ready."""
        if not room.live:
            return
        peer = self.peers.get(room.peer or "")
        if peer is None:
            self.connect(room)
            peer = self.peers.get(room.peer or "")
            if peer is None:
                return
        if peer.agent is None:
            peer.queued.append(room.id)
            return
        plan = self.plans.get(room.id)
        if plan is None:
            return
        fields = {
            "room": room.id,
            "aux_index": plan.aux_index,
            "prefix_pages": plan.prefix_pages,
            "npages": int(plan.pages.size),
        }
        peer.client.send("room", fields, plan.pages.astype("<i8").tobytes())
        self.m.fire(room, Event.METADATA_SENT)

    def abort(self, room: Room, reason: str) -> None:
        """Worker: a local abort."""
        self.fail_after_confirm(room, Event.ABORT, reason)

    def fail_after_confirm(self, room: Room, event: Event, reason: str) -> None:
        """Fail now if nothing can land, else ask prefill and wait for its word."""
        now = self.m.clock()
        peer = self.peers.get(room.peer or "")
        if room.state is KVPoll.Bootstrapping or peer is None or peer.agent is None:
            # nothing can land; still tell a connected prefill so it need not wait for a deadline
            if self.m.table.fire(room, event, now, reason=reason) and peer is not None and peer.agent:
                peer.client.send("abort", {"room": room.id, "reason": reason[:2000]})
            return
        if self.pending_failures.put(room, PendingFailure(event, reason, now)):
            peer.client.send("abort", {"room": room.id, "reason": reason[:2000]})

    # -- inbound ------------------------------------------------------------------

    def _on_message(self, peer: PrefillPeer, msg: Message | ProtocolError, now: float) -> None:
        if isinstance(msg, ProtocolError):
            self.m.log.warning("kvroom.bad_frame", peer=peer.address, error=str(msg))
            return
        if msg.type == "welcome":
            self._on_welcome(peer, msg, now)
            return
        if msg.type == "reject":
            error = IncompatiblePeerError(f"prefill at {peer.address} refused us: {msg.fields['reason']}")
            self._drop_peer(peer, error, Event.TRANSPORT_ERROR, now)
            return
        if peer.agent is None:
            return  # nothing but welcome/reject before the handshake
        peer.last_heard = now
        if msg.type == "failed":
            self._on_failed(peer, msg, now)

    def _on_welcome(self, peer: PrefillPeer, msg: Message, now: float) -> None:
        try:
            layout = KVLayout.from_dict(msg.fields["layout"])
            self.m.pool.layout.check_compatible(layout, msg.fields["agent"])
            name = self.m.agent.add_remote(msg.payload)
        except (ValueError, IncompatiblePeerError) as exc:
            self._drop_peer(peer, IncompatiblePeerError(str(exc)), Event.TRANSPORT_ERROR, now)
            return
        except Exception as exc:
            error = classify(exc, f"add_remote_agent for {peer.address}")
            if error is None:
                raise
            self._drop_peer(peer, error, Event.TRANSPORT_ERROR, now)
            return
        peer.agent = name
        peer.last_heard = now
        self.by_agent[name] = peer
        queued, peer.queued = peer.queued, []
        for room_id in queued:
            room = self.m.table.get(room_id)
            if room is not None:
                self.send_room(room)

    def _on_failed(self, peer: PrefillPeer, msg: Message, now: float) -> None:
        room = self.m.table.get(msg.fields["room"])
        if room is None or room.peer != peer.address:
            return
        pending = self.pending_failures.get(room.id)
        if pending is not None:
            self.m.table.fire(room, pending.event, now, reason=pending.reason)
        else:
            reason = f"prefill failed the room: {msg.fields['reason']}"
            self.m.table.fire(room, Event.REMOTE_ABORT, now, error=RemoteFailureError(reason))

    def _drain_notifications(self, now: float) -> None:
        try:
            notifs = self.m.agent.notifications()
        except Exception as exc:
            if classify(exc, "get_new_notifs") is None:
                raise
            return
        table = self.m.table
        for agent, messages in notifs.items():
            peer = self.by_agent.get(agent)
            if peer is None:
                continue  # not a peer we greeted: ignore
            peer.last_heard = now
            for raw in messages:
                parsed = parse_notif(raw)
                if parsed is None:
                    continue
                room_id, seq, npages, last = parsed
                room = table.get(room_id)
                if room is None or room.peer != peer.address:
                    continue
                plan = self.plans.get(room_id)
                with room.lock:
                    if plan is None or seq in plan.seen or not room.live:
                        continue
                    plan.seen.add(seq)
                table.fire(room, Event.CHUNK_ARRIVED, now, chunks=npages, aux=last)
                table.fire(room, Event.COMPLETE, now)

    def _drop_peer(self, peer: PrefillPeer, error: BaseException, event: Event, now: float) -> None:
        if self.peers.get(peer.address) is not peer:
            return
        del self.peers[peer.address]
        if peer.agent is not None:
            self.by_agent.pop(peer.agent, None)
            self.m.agent.remove_remote(peer.agent)
        peer.client.close()
        self.m.log.warning("kvroom.peer_lost", peer=peer.address, reason=str(error))
        for room in self.m.table.live_rooms():
            if room.peer != peer.address:
                continue
            pending = self.pending_failures.get(room.id)
            if pending is not None:  # the peer is gone, so nothing can land now
                self.m.table.fire(room, pending.event, now, reason=pending.reason)
            else:
                self.m.table.fire(room, event, now, error=error)

    def peer_lost(self, peer: PrefillPeer, error: PeerLostError, now: float) -> None:
        """Fail every room bound to ``peer``; a later room re-handshakes."""
        self._drop_peer(peer, error, Event.PEER_LOST, now)
