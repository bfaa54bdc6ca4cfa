"""Decode's page lists out and arrivals in.

:meth:`DecodeRooms.send_room` sends a room's page list to every prefill rank
of the room once each was greeted (a rank still greeting queues the room), with
each rank's share by the planner's assignment (:func:`~kvroom.node.shares.decode_sources`,
cached per set of peers) and, for ranks whose head slices interleave with ours,
staging reservations first (:class:`~kvroom.node.decode_staging.DecodeStaging`).
A rank the assignment gives nothing gets an empty list: it only watches the room.
Arrivals come in WRITTEN messages (:meth:`DecodeRooms._on_written`), sent by a
prefill rank once its WRITEs are DONE: one notification per chunk it wrote, in
order on its link but in any order across ranks; a rank is finished once it sent
all its chunks and pages, and once every rank finished and every page landed
(and was scattered) the room votes READY.  Success waits for the coordinator's
COMMIT, or, where the coordinator is the room's only prefill rank and this its
only decode rank, comes with the room's last announcement (marked commit).
"""

from __future__ import annotations

from collections.abc import Sequence

import zmq

from kvroom.errors import IncompatiblePeerError, PeerLostError
from kvroom.fsm import Event
from kvroom.fsm.room import Room
from kvroom.node.decode_staging import DecodeStaging
from kvroom.node.decode_state import PrefillPeer
from kvroom.node.shares import Source, decode_sources, kv_heads
from kvroom.protocol import Input
from kvroom.transport.control import ControlClient
from kvroom.transport.notif import Notif, parse_notifs
from kvroom.transport.staging import chunk_count

__all__ = ["DecodeRooms"]


class DecodeRooms(DecodeStaging):
    """Page lists and arrivals, for :class:`~kvroom.node.decode.DecodeSide`."""

    def _peer(self, room: Room, address: str) -> PrefillPeer | None:
        """The peer at ``address``, connecting and greeting it if new (None: ``room`` failed)."""
        try:
            return self._connect(address)
        except (ValueError, zmq.ZMQError) as exc:
            error = PeerLostError(f"bad bootstrap address {address}: {exc}")
            self.m.table.fire(room, Event.PEER_LOST, self.m.clock(), error=error)
            return None

    def _connect(self, address: str) -> PrefillPeer:
        """The peer at ``address``, connecting and greeting it if new (ValueError, ZMQError: bad address)."""
        peer = self.peers.get(address)
        if peer is not None:
            return peer
        now = self.m.clock()
        cfg = self.m.config
        client = ControlClient(self.m.zmq_context, address, cfg.max_message_bytes, cfg.keys)
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

    def forgo(self, room_id: int, addresses: Sequence[str], fingerprint: str, reason: str) -> None:
        """Worker: tell each prefill rank that request ``fingerprint`` will never ask for ``room_id``.

        For a request that holds no room here (another request of ours holds the id):
        prefill fails its room for that request only, now or as it opens, and answers
        nothing (a FAILED for the id would reach the room that holds it).
        """
        said = reason[:2000]
        fields = {"room": room_id, "reason": said, "fingerprint": fingerprint}
        for address in addresses:
            try:
                peer = self._connect(address)
            except (ValueError, zmq.ZMQError) as exc:
                self.m.log.warning("kvroom.forgo_unsent", room=room_id, peer=address, reason=str(exc))
                continue
            if peer.agent is None:  # greeting: said once the handshake is done
                peer.aborts.append((room_id, said, fingerprint))
                del peer.aborts[: -self.m.config.pending_limit]
            else:
                peer.client.send("abort", fields)

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

    def _on_written(self, peer: PrefillPeer, payload: bytes, now: float) -> None:
        """WRITTEN from ``peer``: its WRITEs listed in ``payload`` are DONE, their bytes in place
        (the codec refused a payload that does not parse).  Each room's notifications in it
        are taken together: one lock, one progress event, one look at the verdict."""
        by_room: dict[int, list[Notif]] = {}
        for n in parse_notifs(payload):
            by_room.setdefault(n.room, []).append(n)
        for room_id, mine in by_room.items():
            self._on_chunks(peer, room_id, mine, now)

    def _on_chunks(self, peer: PrefillPeer, room_id: int, notifs: list[Notif], now: float) -> None:
        table = self.m.table
        room = table.get(room_id)
        if room is None or peer.address not in room.peers:
            return
        plan = self.plans.get(room_id)
        arrived: list[Notif] = []
        with room.lock:
            src = plan.sources.get(peer.address) if plan is not None else None
            if plan is None or src is None or not room.live:
                return
            limit = plan.pages.size if src.pages else 0
            for n in notifs:
                if n.seq in src.seen or (n.npages and n.start + n.npages > limit):
                    continue  # a duplicate, or malformed: more pages than this rank may write
                src.seen.add(n.seq)
                src.pages_got += n.npages
                if n.last:
                    src.total = n.seq + 1
                if n.commit and len(room.peers) == 1:  # the only prefill rank committed (protocol 8)
                    src.commits = True
                arrived.append(n)
            if not arrived:
                return
            whole = src.total is not None and len(src.seen) >= src.total
            if whole and src.pages_got >= limit and not src.finished:
                src.finished = True  # notifications can overtake each other: only now is it done
                verdict = self.verdicts.get(room.id)
                if verdict is not None:
                    verdict.finished.add(peer.address)
            done = all(s.finished for s in plan.sources.values())  # every prefill rank ended
        if src.staged:
            for n in arrived:
                if n.npages:
                    self._scatter(room, plan, src, peer.address, n)
        table.fire(room, Event.CHUNK_ARRIVED, now, chunks=sum(n.npages for n in arrived), aux=done)
        with room.lock:  # every page landed (and was scattered): vote; Success waits for the commit
            all_in = done and room.chunks_done >= room.chunks_needed - 1
        if all_in and src.commits:  # it came with the bytes
            self.react(room, Input.COMMITTED_DATA, peer.address)
        elif all_in:
            self.react(room, Input.ALL_DATA_IN)
