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
* tombstones of failed rooms, so late transfer info for them is answered at once.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from kvroom.errors import IncompatiblePeerError, PeerLostError, ProtocolError, RemoteFailureError
from kvroom.fsm import Event, KVPoll, RoomStore, TransitionRecord
from kvroom.fsm.room import Room
from kvroom.transport.codec import Message
from kvroom.transport.control import ControlServer
from kvroom.transport.descriptors import IntArray, page_runs, run_descriptors, validate_pages
from kvroom.transport.faults import classify
from kvroom.transport.layout import KVLayout, Regions
from kvroom.transport.nixl import Transfer

if TYPE_CHECKING:
    from kvroom.manager import KVManager

__all__ = ["PrefillSide", "TransferInfo", "SendPlan", "notif_message", "parse_notif"]


def notif_message(room: int, seq: int, npages: int, last: bool) -> bytes:
    """The NIXL notification that rides on each chunk's WRITE."""
    return f"kvr1:{room}:{seq}:{npages}:{int(last)}".encode()


def parse_notif(msg: bytes) -> tuple[int, int, int, bool] | None:
    """(room, seq, npages, last) or None for anything malformed."""
    try:
        tag, room, seq, npages, last = msg.decode("ascii").split(":")
        values = int(room), int(seq), int(npages), last == "1"
    except (UnicodeDecodeError, ValueError):
        return None
    if tag != "kvr1" or values[0] < 0 or values[1] < 0 or values[2] < 0 or last not in ("0", "1"):
        return None
    return values


@dataclass
class DecodePeer:
    """A decode process that completed the handshake."""

    identity: bytes
    agent: str
    layout: KVLayout
    regions: Regions
    last_seen: float


@dataclass(frozen=True)
class TransferInfo:
    """Where decode wants a room's pages: its page list, aux slot, prefix."""

    peer: str
    pages: IntArray
    aux_index: int | None
    prefix_pages: int


@dataclass
class SendPlan:
    """What the scheduler promised in ``init()`` and how far ``send()`` got."""

    num_pages: int
    aux_index: int | None
    sent_pages: int = 0
    seq: int = 0


class PrefillSide:
    """Everything the prefill manager's worker does."""

    def __init__(self, manager: KVManager, port: int) -> None:
        self.m = manager
        cfg = manager.config
        self.server = ControlServer(manager._ctx, cfg.host, port, cfg.max_message_bytes)
        self.address = self.server.address
        table = manager.table
        self.send_plans: RoomStore[SendPlan] = table.register_store(RoomStore("send_plans"))
        self.handles: RoomStore[list[Transfer]] = table.register_store(RoomStore("xfer_handles"))
        self.peers: dict[bytes, DecodePeer] = {}
        self.by_agent: dict[str, DecodePeer] = {}
        self.pending: collections.OrderedDict[int, tuple[bytes, Message, float]] = collections.OrderedDict()
        self.tombstones: collections.OrderedDict[int, tuple[str, float]] = collections.OrderedDict()
        self.active: list[Transfer] = []
        self.draining: dict[int, tuple[str, str, list[Transfer]]] = {}

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
        for _ in range(256):
            got = self.server.recv()
            if got is None:
                break
            self._on_message(got[0], got[1], now)
        if self.active:
            self._poll_transfers(now)
        if self.draining:
            self._poll_draining()
        timeout = self.m.config.heartbeat_timeout
        for peer in [p for p in self.peers.values() if now - p.last_seen > timeout]:
            self.peer_lost(
                peer, PeerLostError(f"decode {peer.agent} silent for {now - peer.last_seen:.1f} s"), now
            )

    def expire(self, now: float) -> None:
        """Room deadlines, and the age limits of pending info and tombstones."""
        self.m.table.expire(now)
        while self.pending:
            room_id, (identity, _msg, born) = next(iter(self.pending.items()))
            if now - born <= self.m.config.pending_ttl:
                break
            del self.pending[room_id]
            self.server.send(
                identity, "failed", {"room": room_id, "reason": "no prefill request with this room id"}
            )
        while self.tombstones and next(iter(self.tombstones.values()))[1] < now:
            self.tombstones.popitem(last=False)

    def snapshot(self) -> dict[str, Any]:
        """Operator counters."""
        return {
            "bootstrap_addr": self.address,
            "peers": sorted(p.agent for p in self.peers.values()),
            "pending_infos": len(self.pending),
            "in_flight": len(self.active),
            "draining_rooms": len(self.draining),
        }

    def close(self) -> None:
        """Release every handle and close the socket."""
        for t in self.active:
            self.m.agent.release(t)
        self.active.clear()
        self.server.close()

    # -- room lifecycle (called from the manager / sender) -----------------------

    def adopt_pending(self, room: Room) -> None:
        """Worker: apply transfer info that arrived before the room existed."""
        entry = self.pending.pop(room.id, None)
        if entry is not None:
            self._on_message(entry[0], entry[1], self.m.clock())

    def on_transition(self, record: TransitionRecord) -> None:
        """Observer hook (room lock held): a failed room must notify its decode."""
        if record.dst is not KVPoll.Failed:
            return
        transfers = list(self.handles.get(record.room) or ())
        peer = record.peer
        reason = record.reason or "failed on prefill"
        self.m.enqueue(lambda: self._after_failure(record.room, peer, reason, transfers, record.event))

    def _after_failure(
        self, room_id: int, peer: str | None, reason: str, transfers: list[Transfer], event: Event
    ) -> None:
        now = self.m.clock()
        self.tombstones[room_id] = (reason, now + self.m.config.pending_ttl)
        while len(self.tombstones) > self.m.config.pending_limit:
            self.tombstones.popitem(last=False)
        if peer is None or event is Event.PEER_LOST or peer not in self.by_agent:
            return
        live = [t for t in transfers if not t.released]
        if live:
            self.draining[room_id] = (peer, reason, live)
        else:
            self._notify_failed(peer, room_id, reason)

    def _notify_failed(self, agent: str, room_id: int, reason: str) -> None:
        peer = self.by_agent.get(agent)
        if peer is not None:
            self.server.send(peer.identity, "failed", {"room": room_id, "reason": reason[:2000]})

    def post_chunk(self, room: Room, src: IntArray, offset: int, seq: int, last: bool) -> None:
        """Worker: WRITE one chunk of ``room`` (pages ``offset..`` of the request)."""
        if not room.live:
            return
        info = self.m.table.transfer_infos.get(room.id)
        plan = self.send_plans.get(room.id)
        if info is None or plan is None:
            return
        peer = self.by_agent.get(info.peer)
        if peer is None:
            return  # the peer is gone; its rooms were failed with it
        skip = max(0, info.prefix_pages - offset)
        src = src[skip:]
        lo = offset + skip - info.prefix_pages
        dst = info.pages[lo : lo + src.size]
        pool, regions = self.m.pool, peer.regions
        s_start, d_start, lengths = page_runs(src, dst)
        local = run_descriptors(pool.regions.bases, pool.page_bytes, s_start, lengths, pool.device)
        remote = run_descriptors(regions.bases, pool.page_bytes, d_start, lengths, regions.device)
        # (local rows, local mem, remote rows, remote mem, pages, carries the end of the room)
        writes: list[tuple[Any, str, Any, str, int, bool]] = []
        if local.shape[0]:
            writes.append((local, pool.mem, remote, regions.mem, int(src.size), last))
        if last and plan.aux_index is not None and info.aux_index is not None:
            slot = pool.aux_slot_bytes
            local_aux = np.array(
                [[pool.regions.aux_base + plan.aux_index * slot, slot, pool.aux_device]], np.uint64
            )
            remote_aux = np.array(
                [[regions.aux_base + info.aux_index * slot, slot, regions.aux_device]], np.uint64
            )
            if writes and pool.aux_mem == pool.mem and regions.aux_mem == regions.mem:
                writes[0] = (
                    np.vstack([local, local_aux]),
                    pool.mem,
                    np.vstack([remote, remote_aux]),
                    regions.mem,
                    int(src.size),
                    True,
                )
            else:  # aux in another memory type: its own WRITE, which carries the end
                if writes:
                    writes[0] = (*writes[0][:5], False)
                writes.append((local_aux, pool.aux_mem, remote_aux, regions.aux_mem, 0, True))
        if not writes:
            if last:  # nothing to copy (all in decode's prefix, no aux): decode still needs the end
                self._notify_end(room, peer, seq)
            return
        for i, (lrows, lmem, rrows, rmem, npages, ends) in enumerate(writes):
            if not self._write(room, peer, lrows, lmem, rrows, rmem, seq + i, npages, ends):
                return

    def _notify_end(self, room: Room, peer: DecodePeer, seq: int) -> None:
        try:
            self.m.agent.notify(peer.agent, notif_message(room.id, seq, 0, True))
        except Exception as exc:
            self._fault(room, peer, exc, f"notify room {room.id}", self.m.clock())
            return
        self.m.fire(room, Event.COMPLETE, aux=True)

    def _write(
        self,
        room: Room,
        peer: DecodePeer,
        local: Any,
        local_mem: str,
        remote: Any,
        remote_mem: str,
        seq: int,
        npages: int,
        last: bool,
    ) -> bool:
        """Post one WRITE; False when it failed (the room or the peer failed with it)."""
        notif = notif_message(room.id, seq, npages, last)
        try:
            transfer, state = self.m.agent.write(
                peer.agent, local, local_mem, remote, remote_mem, notif, room.id, last
            )
        except Exception as exc:
            self._fault(room, peer, exc, f"WRITE room {room.id}", self.m.clock())
            return False
        with room.lock:
            if room.live:
                handles = self.handles.get(room.id)
                if handles is None:
                    handles = []
                    self.handles.put_locked(room, handles)
                handles.append(transfer)
                room.chunks_needed += 1
        if state == "DONE":
            self._done(transfer)
        else:
            self.active.append(transfer)
        return True

    def _done(self, transfer: Transfer) -> None:
        self.m.agent.release(transfer)
        room = self.m.table.get(transfer.room)
        if room is not None and room.peer == transfer.peer:
            self.m.fire(room, Event.COMPLETE, chunks=1, aux=transfer.last)

    def _fault(self, room: Room | None, peer: DecodePeer, exc: BaseException, what: str, now: float) -> None:
        error = classify(exc, f"{what} to {peer.agent}")
        if error is None:
            raise exc  # a bug, not a transport fault
        if isinstance(error, PeerLostError):
            self.peer_lost(peer, error, now)
        elif room is not None:
            self.m.table.fire(room, Event.TRANSPORT_ERROR, now, error=error)

    def _poll_transfers(self, now: float) -> None:
        still = []
        agent = self.m.agent
        for t in self.active:
            if t.released:
                continue
            try:
                state = agent.state(t)
            except Exception as exc:
                agent.release(t)
                peer = self.by_agent.get(t.peer)
                room = self.m.table.get(t.room)
                if peer is not None:
                    self._fault(room, peer, exc, f"WRITE room {t.room}", now)
                continue
            if state == "DONE":
                self._done(t)
            else:
                still.append(t)
        self.active = [t for t in still if not t.released]

    def _poll_draining(self) -> None:
        for room_id, (peer, reason, transfers) in list(self.draining.items()):
            if all(t.released for t in transfers):
                del self.draining[room_id]
                self._notify_failed(peer, room_id, reason)

    def peer_lost(self, peer: DecodePeer, error: PeerLostError, now: float) -> None:
        """Fail exactly the rooms bound to ``peer``; forget it and its handles."""
        if self.peers.get(peer.identity) is not peer:
            return
        del self.peers[peer.identity]
        self.by_agent.pop(peer.agent, None)
        self.m.log.warning("kvroom.peer_lost", peer=peer.agent, reason=str(error))
        for room in self.m.table.live_rooms():
            if room.peer == peer.agent:
                self.m.table.fire(room, Event.PEER_LOST, now, error=error)
        for t in self.active:
            if t.peer == peer.agent:
                self.m.agent.release(t)
        self.active = [t for t in self.active if not t.released]
        for room_id in [r for r, (agent, _, _) in self.draining.items() if agent == peer.agent]:
            del self.draining[room_id]
        for room_id in [r for r, (ident, _, _) in self.pending.items() if ident == peer.identity]:
            del self.pending[room_id]
        self.m.agent.remove_remote(peer.agent)

    # -- control messages -------------------------------------------------------

    def _on_message(self, identity: bytes, msg: Message | ProtocolError, now: float) -> None:
        peer = self.peers.get(identity)
        if isinstance(msg, ProtocolError):
            self.m.log.warning(
                "kvroom.bad_frame", peer=peer.agent if peer else identity.hex(), error=str(msg)
            )
            return
        if msg.type == "hello":
            self._on_hello(identity, msg, now)
            return
        if peer is None:
            return  # room traffic only from peers that completed the handshake
        peer.last_seen = now
        if msg.type == "ping":
            self.server.send(identity, "pong")
        elif msg.type == "room":
            self._on_room(peer, identity, msg, now)
        elif msg.type == "abort":
            self._on_abort(peer, msg, now)

    def _on_hello(self, identity: bytes, msg: Message, now: float) -> None:
        agent = msg.fields["agent"]
        try:
            layout = KVLayout.from_dict(msg.fields["layout"])
            regions = Regions.from_dict(msg.fields["regions"])
            self.m.pool.layout.check_compatible(layout, agent)
            if len(regions.bases) != layout.layers:
                raise ValueError(f"{len(regions.bases)} layer regions for {layout.layers} layers")
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
        peer = DecodePeer(identity, agent, layout, regions, now)
        self.peers[identity] = peer
        self.by_agent[agent] = peer
        fields = {"agent": self.m.agent_name, "layout": self.m.pool.layout.to_dict()}
        self.server.send(identity, "welcome", fields, self.m.agent.metadata())
        self.m.log.info("kvroom.peer_joined", peer=agent)

    def _on_room(self, peer: DecodePeer, identity: bytes, msg: Message, now: float) -> None:
        room_id = msg.fields["room"]
        reason = self._check_room_msg(peer, msg)
        if reason is not None:
            self.server.send(identity, "failed", {"room": room_id, "reason": reason})
            return
        room = self.m.table.get(room_id)
        if room is None:
            tomb = self.tombstones.get(room_id)
            if tomb is not None:
                self.server.send(identity, "failed", {"room": room_id, "reason": tomb[0][:2000]})
                return
            self.pending[room_id] = (identity, msg, now)
            self.pending.move_to_end(room_id)
            while len(self.pending) > self.m.config.pending_limit:
                old_id, (old_ident, _, _) = self.pending.popitem(last=False)
                self.server.send(
                    old_ident, "failed", {"room": old_id, "reason": "prefill pending-room limit reached"}
                )
            return
        pages = np.frombuffer(msg.payload, dtype="<i8").astype(np.int64)
        info = TransferInfo(peer.agent, pages, msg.fields["aux_index"], msg.fields["prefix_pages"])
        with room.lock:
            if not room.live or room.state is not KVPoll.Bootstrapping or room.peer not in (None, peer.agent):
                return  # late or duplicate info: nothing changes
            room.peer = peer.agent
            self.m.table.transfer_infos.put_locked(room, info)
            self.m.table.decode_prefix_lens.put_locked(room, info.prefix_pages)
        plan = self.send_plans.get(room.id)
        if plan is not None and not self._plan_fits(room, plan, info):
            return
        self.m.table.fire(room, Event.DST_INFO, now, infos=1)

    def _check_room_msg(self, peer: DecodePeer, msg: Message) -> str | None:
        pages = np.frombuffer(msg.payload, dtype="<i8")
        try:
            validate_pages(pages, peer.regions.num_pages, f"room {msg.fields['room']}")
        except (TypeError, ValueError) as exc:
            return str(exc)
        aux = msg.fields["aux_index"]
        if aux is not None and not 0 <= aux < peer.regions.aux_slots:
            return f"aux index {aux} out of range for {peer.regions.aux_slots} slots"
        return None

    def _plan_fits(self, room: Room, plan: SendPlan, info: TransferInfo) -> bool:
        """Decode's page count must equal prefill's pages after the prefix."""
        expected = plan.num_pages - info.prefix_pages
        if expected == info.pages.size and info.prefix_pages <= plan.num_pages:
            return True
        error = RemoteFailureError(
            f"room {room.id}: decode sent {info.pages.size} pages after a {info.prefix_pages}-page prefix, "
            f"but prefill has {plan.num_pages} pages"
        )
        self.m.fire(room, Event.REMOTE_ABORT, error=error)
        return False

    def check_plan(self, room: Room) -> None:
        """Worker, after ``init()``: validate info that arrived before it."""
        info = self.m.table.transfer_infos.get(room.id)
        plan = self.send_plans.get(room.id)
        if info is not None and plan is not None:
            self._plan_fits(room, plan, info)

    def _on_abort(self, peer: DecodePeer, msg: Message, now: float) -> None:
        room_id, reason = msg.fields["room"], f"aborted by decode: {msg.fields['reason']}"
        room = self.m.table.get(room_id)
        if room is not None and room.peer == peer.agent:
            self.m.table.fire(room, Event.REMOTE_ABORT, now, error=RemoteFailureError(reason))
            return  # the failure notice follows once nothing is in flight
        if room is None:
            self.pending.pop(room_id, None)
            self.tombstones[room_id] = (reason, now + self.m.config.pending_ttl)
        self.server.send(peer.identity, "failed", {"room": room_id, "reason": reason[:2000]})
