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
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import zmq

from kvroom.errors import (
    IncompatiblePeerError,
    PeerLostError,
    ProtocolError,
    RemoteFailureError,
)
from kvroom.fsm import Event, KVPoll, RoomStore, TransitionRecord
from kvroom.fsm.room import Room
from kvroom.node.decode_staging import DecodeStaging
from kvroom.node.shares import Source, decode_sources, kv_heads
from kvroom.planning import RankLayout
from kvroom.protocol import DecodeVerdict, Input, Msg, Outcome
from kvroom.protocol.verdicts import Verdicts, fire_actions
from kvroom.transport.codec import Message
from kvroom.transport.control import ControlClient
from kvroom.transport.faults import bounded, classify, for_room
from kvroom.transport.layout import range_overlap
from kvroom.transport.notif import Notif, parse_notifs
from kvroom.transport.staging import Reservation, StagingStore, chunk_count

if TYPE_CHECKING:
    from kvroom.node.host import NodeHost

from kvroom.node.decode_state import PrefillPeer, ReceivePlan

__all__ = ["DecodeSide", "ReceivePlan"]


class DecodeSide(DecodeStaging):
    """Everything the decode manager's worker does."""

    def __init__(self, manager: NodeHost) -> None:
        self.m = manager
        table = manager.table
        self.plans: RoomStore[ReceivePlan] = table.register_store(RoomStore("receive_plans"))
        self.verdicts: Verdicts[DecodeVerdict] = table.register_store(
            Verdicts(lambda room: DecodeVerdict(room.id, room.peers))
        )
        # rooms failing once their sources confirm: since when (bounded by 2 x heartbeat timeout)
        self.failing_since: RoomStore[float] = table.register_store(RoomStore("failing_since"))
        assert isinstance(table.prefetch_requested, StagingStore) and table.prefetched_rooms is not None
        self.staging: StagingStore = table.prefetch_requested
        self.prefetched: RoomStore[int] = table.prefetched_rooms
        self.ring = self.staging.ring
        self.peers: dict[str, PrefillPeer] = {}
        self.by_agent: dict[str, PrefillPeer] = {}
        self._registered: set[Any] = set()
        self._shares: dict[tuple[str, ...], list[Source]] = {}  # the assignment per set of peers
        self.waiting_staging: list[Room] = []  # rooms whose page list waits for ring space
        # staging reserved for rooms not created yet: room id -> (reservations, pages, expiry)
        self._early: dict[int, tuple[dict[tuple[Hashable, ...], Reservation], int, float]] = {}
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

    def busy(self) -> bool:
        """True while rooms hold page lists: their notifications are only seen by polling NIXL."""
        return len(self.plans) > 0

    def step(self, ready: dict[Any, int], now: float) -> None:
        """Messages, notifications, heartbeats, rooms waiting for staging space."""
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
        self._drain_notifications(now)
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

    def on_transition(self, record: TransitionRecord) -> None:
        """Observer hook: nothing to do on decode."""

    # -- commands from receivers --------------------------------------------------

    def _peer(self, room: Room, address: str) -> PrefillPeer | None:
        """The peer at ``address``, connecting and greeting it if new."""
        peer = self.peers.get(address)
        if peer is not None:
            return peer
        now = self.m.clock()
        try:
            cfg = self.m.config
            client = ControlClient(self.m.zmq_context, address, cfg.max_message_bytes, cfg.keys)
        except (ValueError, zmq.ZMQError) as exc:
            self.m.table.fire(
                room, Event.PEER_LOST, now, error=PeerLostError(f"bad bootstrap address {address}: {exc}")
            )
            return None
        peer = PrefillPeer(address, client, last_heard=now)
        self.peers[address] = peer
        tensors = self.m.tensors
        fields = {
            "agent": self.m.agent_name,
            "rank": self.m.regions.to_dict(),
            "staging_base": tensors.regions.staging_base if tensors is not None else 0,
            "staging_bytes": tensors.regions.staging_bytes if tensors is not None else 0,
        }
        client.send("hello", fields, self.m.agent.metadata())
        return peer

    def connect(self, room: Room) -> None:
        """Worker: make sure every prefill rank of the room exists and was greeted."""
        for address in room.peers:
            if not room.live or self._peer(room, address) is None:
                return

    def send_room(self, room: Room) -> None:
        """Worker: send the room's page list to every prefill rank once all are ready."""
        plan = self.plans.get(room.id)
        if not room.live or plan is None or plan.sent or self.verdicts.of(room) is None:
            return
        peers = []
        for address in room.peers:
            peer = self._peer(room, address)
            if peer is None:
                return
            if peer.agent is None:
                if room.id not in peer.queued:
                    peer.queued.append(room.id)
                return
            peers.append(peer)
        sources = self._sources(room, peers)
        if sources is None or not self._reserve(room, plan, sources):
            return
        npages = int(plan.pages.size)
        size = self.m.config.staging_chunk_pages
        for peer in peers:
            src = sources[peer.address]
            staging = None
            if src.staged and npages:
                chunks = range(chunk_count(npages, size))
                staging = [self._reservation(room, c, peer.address).offset for c in chunks]
            writes = src.writes
            state = {k: v.tolist() for k, v in plan.state.items()} if writes and plan.state else None
            fields = {
                "room": room.id,
                "aux_index": plan.aux_index if writes else None,
                "prefix_pages": plan.prefix_pages,
                "npages": npages if writes else 0,
                "staging": staging,
                "chunk_pages": size,
                "state": state,
                "fingerprint": plan.fingerprint,
            }
            peer.client.send("room", fields, plan.pages.astype("<i8").tobytes() if writes else b"")
        with room.lock:
            if not room.live:
                return
            plan.sources = sources
            plan.sent = True
            verdict = self.verdicts.get(room.id)
            if verdict is not None:
                verdict.sent = True
                verdict.writers = frozenset(a for a, s in sources.items() if s.writes)
            # every page from every rank writing pages, then the coordinator's commit
            room.chunks_needed = npages * sum(s.pages for s in sources.values()) + 1
        self.m.fire(room, Event.METADATA_SENT)

    def _sources(self, room: Room, peers: list[PrefillPeer]) -> dict[str, Source] | None:
        """Each prefill rank's share, by the assignment; None (room failed) when the ranks don't fit."""
        layouts = [p.layout for p in peers if p.layout is not None]
        for i, (peer, theirs) in enumerate(zip(peers, layouts, strict=True)):
            ranks, at = theirs.tp_size * theirs.pp_size, theirs.pp_rank * theirs.tp_size + theirs.tp_rank
            if ranks != len(peers) or at != i:
                error = IncompatiblePeerError(
                    f"room {room.id}: bootstrap address #{i} ({peer.address}) is prefill rank tp "
                    f"{theirs.tp_rank} of {theirs.tp_size}, pp {theirs.pp_rank} of {theirs.pp_size}, but "
                    f"the room lists {len(peers)} addresses (stage-major, one per rank)"
                )
                self.m.fire(room, Event.TRANSPORT_ERROR, error=error)
                return None
        key = tuple(str(p.agent) for p in peers)  # a new incarnation is a new agent: a new key
        shares = self._shares.get(key)
        if shares is None:
            try:
                shares = decode_sources(self.m.regions.layout, layouts, lambda s: self._stages(kv_heads(s)))
            except IncompatiblePeerError as exc:
                error = IncompatiblePeerError(f"room {room.id}: {exc}")
                self.m.fire(room, Event.TRANSPORT_ERROR, error=error)
                return None
            if len(self._shares) >= 64:
                self._shares.clear()
            self._shares[key] = shares
        return {  # fresh progress per room
            p.address: Source(s.writes, s.pages, s.staged, s.heads, s.src_heads)
            for p, s in zip(peers, shares, strict=True)
        }

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
                    peer.aborts.append((room.id, fields["reason"]))
                    del peer.aborts[: -self.m.config.pending_limit]
                continue
            peer.client.send(send.msg.value, fields)

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
        for room_id, reason in aborts:  # rooms aborted while we greeted: prefill frees them now
            peer.client.send(Msg.ABORT.value, {"room": room_id, "reason": reason})

    def _drain_notifications(self, now: float) -> None:
        try:
            notifs = self.m.agent.notifications()
        except Exception as exc:
            if classify(exc, "get_new_notifs") is None:
                raise
            return
        for agent, messages in notifs.items():
            peer = self.by_agent.get(agent)
            if peer is None:
                continue  # not a peer we greeted: ignore
            peer.last_heard = now
            for raw in messages:
                for parsed in parse_notifs(raw):
                    self._on_chunk(peer, parsed, now)

    def _on_chunk(self, peer: PrefillPeer, n: Notif, now: float) -> None:
        table = self.m.table
        room = table.get(n.room)
        if room is None or peer.address not in room.peers:
            return
        plan = self.plans.get(n.room)
        with room.lock:
            src = plan.sources.get(peer.address) if plan is not None else None
            if plan is None or src is None or n.seq in src.seen or not room.live:
                return
            if n.npages and n.start + n.npages > (plan.pages.size if src.pages else 0):
                return  # malformed: more pages than this rank may write
            src.seen.add(n.seq)
            src.pages_got += n.npages
            if n.last:
                src.total = n.seq + 1
            writes = int(plan.pages.size) if src.pages else 0
            whole = src.total is not None and len(src.seen) >= src.total
            if whole and src.pages_got >= writes and not src.finished:
                src.finished = True  # notifications can overtake each other: only now is it done
                verdict = self.verdicts.get(room.id)
                if verdict is not None:
                    verdict.finished.add(peer.address)
            done = all(s.finished for s in plan.sources.values())  # every prefill rank ended
        if src.staged and n.npages:
            self._scatter(room, plan, src, peer.address, n)
        table.fire(room, Event.CHUNK_ARRIVED, now, chunks=n.npages, aux=done)
        with room.lock:  # every page landed (and was scattered): vote; Success waits for the commit
            all_in = done and room.chunks_done >= room.chunks_needed - 1
        if all_in:
            self.react(room, Input.ALL_DATA_IN)

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
