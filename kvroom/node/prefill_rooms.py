"""Prefill's room messages: decode's page lists and aborts, bound to who sent them.

A page list (``room``) names a room id, decode's pages after the prefix it
holds, its state rows, aux slot and staging offsets; :meth:`PrefillRooms._on_room`
validates it against the peer's regions (:meth:`PrefillRooms._parse_info`) and
either binds it to the room or, when the scheduler has not created the room yet
(decode is often faster), keeps it in ``pending``: a remote message never
creates a room.  Pending info is capped in count and age; evicted entries are
answered FAILED.  :meth:`PrefillRooms.adopt_pending` applies it once the room
exists.

Who may act on a room (the decode *principal*: its authenticated CURVE key
with ``ManagerConfig.keys``, else its agent name): a room is bound to the
decode ranks whose page lists it took.  An abort, vote, commit or page list
for a room bound to another principal is ignored, logged
(``kvroom.foreign_room_message``) and counted; a page list is also answered
FAILED so its sender does not wait.  A room still waiting for page lists may
take more ranks: with keys only ranks of a principal already bound (or the
first), without keys any (as the rank count cannot be checked otherwise).  With
keys, an abort for a room no rank bound yet is held against its sender only:
that sender's page list for it is refused later.  Rooms whose decode left while
its page list waited (it aborted, named another request, or was lost) are
remembered (``orphans``, ``lost``) so that without keys such a room fails as
it opens instead of holding its pages to a deadline.  An abort that names a
request (its fingerprint: decode could not open the room because another of its
requests holds the id) fails prefill's room for that request only, now or as it
opens (``forgone``), and is never answered.
"""

from __future__ import annotations

import numpy as np

from kvroom.errors import PeerLostError, RemoteFailureError, RequestMismatchError
from kvroom.fsm import Event, KVPoll
from kvroom.fsm.room import Room
from kvroom.node.prefill_state import DecodePeer, SendPlan, TransferInfo
from kvroom.node.prefill_verdicts import PrefillVerdicts
from kvroom.protocol import Input
from kvroom.transport.codec import Message
from kvroom.transport.descriptors import IntArray, validate_pages
from kvroom.transport.staging import chunk_pages

__all__ = ["PrefillRooms"]


class PrefillRooms(PrefillVerdicts):
    """Page lists and aborts, for :class:`~kvroom.node.prefill.PrefillSide`."""

    def adopt_pending(self, room: Room) -> None:
        """Worker: apply transfer info that arrived before the room existed.

        A room whose decode left while its page list waited (an orphan) fails now, unless a
        page list of another decode principal waits for it too.
        """
        entries = self.pending.pop(room.id, [])
        orphan, lost = self.orphans.pop(room.id, None), self.lost.pop(room.id, None)
        if self._forgone_at_open(room, entries):
            return
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

    def _forgone_at_open(self, room: Room, entries: list[tuple[bytes, Message, float]]) -> bool:
        """Fail a room as it opens if decode said its request will never ask for it (True: failed).

        A page list waiting with the room's fingerprint is that request's own: the room is
        wanted, and what decode said holds for a later room of that id and request.
        """
        fingerprint = self.fingerprints.get(room.id)
        if fingerprint is None or any(e[1].fields["fingerprint"] == fingerprint for e in entries):
            return False
        reason = self.forgone.take(room.id, fingerprint)
        if reason is None:
            return False
        for identity, _msg, _born in entries:  # other requests' page lists: the room is not theirs
            self._send_failed(identity, room.id, reason)
        self.m.fire(room, Event.REMOTE_ABORT, error=RemoteFailureError(reason))
        return True

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
        if msg.fields["fingerprint"] is not None:
            self._on_forgo(peer, room_id, msg.fields["fingerprint"], reason, now)
            return
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

    def _on_forgo(self, peer: DecodePeer, room_id: int, fingerprint: str, reason: str, now: float) -> None:
        """Decode's request ``fingerprint`` will never ask for ``room_id`` (:meth:`kvroom.KVManager.forgo`).

        Prefill's open room for that request fails now, unless the peer bound it (that is
        another request of the peer's, with the same tokens: the word is for a later room);
        otherwise the room fails as it opens.  A room for another request is untouched, and
        nothing is answered: decode has no room for the id but the one that holds it.
        """
        room = self.m.table.get(room_id)
        if (
            room is not None
            and room.live
            and room.state is KVPoll.Bootstrapping
            and self.fingerprints.get(room_id) == fingerprint
            and peer.agent not in room.peers
            and (not room.peers or self._may_act(room, peer))
        ):
            self.m.log.info("kvroom.room_forgone", room=room_id, peer=peer.agent)
            self.react(room, Input.ABORT, peer.agent, reason=reason, error=RemoteFailureError(reason))
            return
        self.forgone.add(room_id, fingerprint, reason, now)
