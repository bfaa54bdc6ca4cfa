"""Prefill's write path: chunks to planned WRITEs, the outbox, posting, completions and faults.

:class:`PrefillWrites` is the part of :class:`~kvroom.node.prefill.PrefillSide`
that turns a ``send()`` chunk into WRITEs for every decode rank of the room
(:func:`~kvroom.planning.align_chunk`, then the peer's cached route or the
staging ring, :mod:`kvroom.node.shares`), queues them in the turn's
:class:`~kvroom.node.outbox.Outbox`, posts each batch as one NIXL transfer
(:meth:`PrefillWrites.flush`), and turns DONE into ``COMPLETE`` here and then
``WRITTEN`` to decode (a room with one rank on each side: its last one commits it),
and NIXL faults into protocol inputs.  Only the worker thread runs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvroom.errors import PeerLostError
from kvroom.fsm import Event, KVPoll
from kvroom.fsm.room import Room
from kvroom.node.outbox import Batch
from kvroom.node.prefill_verdicts import PrefillVerdicts
from kvroom.node.shares import ChunkWrite, DeferredWrite, deferred_writes, direct_writes, staged_writes
from kvroom.planning import align_chunk
from kvroom.protocol import Input
from kvroom.transport.descriptors import IntArray
from kvroom.transport.faults import classify, for_room
from kvroom.transport.nixl import Transfer
from kvroom.transport.notif import mark_commits, notif_message

if TYPE_CHECKING:
    from kvroom.node.prefill_state import DecodePeer, SendPlan, TransferInfo

__all__ = ["PrefillWrites"]


class PrefillWrites(PrefillVerdicts):
    """The write path, for :class:`~kvroom.node.prefill.PrefillSide`."""

    def post_chunk(self, room: Room, src: IntArray, offset: int, last: bool) -> None:
        """Worker: WRITE one chunk of ``room`` (pages ``offset..`` of the request) to every rank."""
        if not room.live:
            return
        infos: dict[str, TransferInfo] | None = self.m.table.transfer_infos.get(room.id)
        plan = self.send_plans.get(room.id)
        if infos is None or plan is None:
            return
        writes: list[tuple[DecodePeer, ChunkWrite | DeferredWrite]] = []
        ends: list[DecodePeer] = []  # ranks whose share ends with no WRITE in this chunk
        for info in infos.values():
            peer = self.by_agent.get(info.peer)
            if peer is None:
                return  # the peer is gone; its rooms were failed with it
            try:
                mine = self._chunk_writes(peer, info, plan, src, offset, last) if info.writes else []
            except ValueError as exc:
                self.react(room, Input.WRITE_ERROR, peer.agent, reason=f"room {room.id}: {exc}", error=exc)
                return
            writes.extend((peer, w) for w in mine)
            if last and not mine:
                ends.append(peer)
        if last:  # Success also waits for the votes (coordinator) or the relayed commit: count first
            verdict = self.verdicts.of(room)
            if verdict is None:
                return
            layout = self.m.regions.layout
            with room.lock:
                room.chunks_needed += verdict.needed(
                    len(infos), layout.tp_size * layout.pp_size, bool(writes)
                )
            self.react(room, Input.DELIVERED)
        for peer in ends:
            self._notify_end(room, peer, plan)
        if writes:
            with room.lock:  # count every WRITE of the chunk before any of them can complete
                if not room.live:
                    return
                room.chunks_needed += len(writes)
        final = {peer.agent: i for i, (peer, _) in enumerate(writes)} if last else {}
        for i, (peer, w) in enumerate(writes):
            seq = plan.seqs.get(peer.agent, 0)
            plan.seqs[peer.agent] = seq + 1
            notif = notif_message(room.id, seq, w.start, w.npages, final.get(peer.agent) == i)
            full = self.outbox.add(peer.agent, w, notif, room.id, last and i == len(writes) - 1)
            if full is not None:
                self._post(full)
        if last and not writes:  # nothing to copy: the room ends here
            self.m.fire(room, Event.COMPLETE, aux=True)

    def flush(self) -> None:
        """Worker, after a turn's commands: post every WRITE the outbox holds."""
        for batch in self.outbox.take():
            self._post(batch)

    def _chunk_writes(
        self, peer: DecodePeer, info: TransferInfo, plan: SendPlan, src: IntArray, offset: int, last: bool
    ) -> Sequence[ChunkWrite | DeferredWrite]:
        """The WRITEs of pages ``src`` (request pages ``offset..``), and with the last its rows."""
        aux = None
        if plan.aux_index is not None and info.aux_index is not None:
            aux = (plan.aux_index, info.aux_index)
        state: dict[str, tuple[object, object]] = {}
        for space in sorted(peer.route.spaces - {"kv", "aux"}) if last else ():
            ours, theirs = (plan.state or {}).get(space), info.state.get(space)
            if ours is None or theirs is None:
                side = "the sender" if ours is None else f"decode {peer.agent}"
                raise ValueError(f"state {space!r}: {side} gave no state_indices for it")
            state[space] = (ours, theirs)
        indices = align_chunk(src, offset, info.pages, info.prefix_pages, last=last, state=state, aux=aux)
        if info.staging is None:
            deferred = deferred_writes(peer.route, indices)  # planned with the turn's others
            return direct_writes(peer.route, indices) if deferred is None else deferred
        tensors, kv = self.m.tensors, peer.rank.pool.kv[0]
        assert tensors is not None  # _parse_info refuses staging otherwise
        return staged_writes(
            self.m.regions, peer.route, indices, info.staging, info.chunk_pages, int(info.pages.size),
            peer.staging[0], tensors.staging_unit_bytes, kv.mem, kv.device,
        )  # fmt: skip

    def _notify_end(self, room: Room, peer: DecodePeer, plan: SendPlan) -> None:
        """A rank's share ended with no WRITE: tell it in a bare notification."""
        seq = plan.seqs.get(peer.agent, 0)
        self.server.send(peer.identity, "written", payload=notif_message(room.id, seq, 0, 0, True))
        plan.seqs[peer.agent] = seq + 1

    def _live(self, room_id: int) -> bool:
        room = self.m.table.get(room_id)
        return room is not None and room.live

    def _post(self, batch: Batch) -> None:
        """Post one batch of WRITEs as one transfer, without the rooms that failed meanwhile."""
        peer = self.by_agent.get(batch.agent)
        if peer is None:
            return  # the peer is gone; its rooms were failed with it
        batch = batch.keep(self._live)
        if not batch.entries:
            return
        try:
            local, remote = batch.rows()
        except ValueError:  # some room's index is out of range: fail those rooms, post the rest
            batch, bad = batch.split()
            for room_id, exc in bad:
                room = self.m.table.get(room_id)
                if room is not None:
                    reason = f"room {room_id}: {exc}"
                    self.react(room, Input.WRITE_ERROR, peer.agent, reason=reason, error=exc)
            if not batch.entries:
                return
            local, remote = batch.rows()
        try:
            transfer, state = self.m.agent.write(
                batch.agent, local, batch.local_mem, remote, batch.remote_mem, batch.notif, batch.rooms
            )
        except Exception as exc:
            self._fault(sorted({e.room for e in batch.entries}), peer, exc, "WRITE", self.m.clock())
            return
        tracked: set[int] = set()
        for e in batch.entries:
            plan = self.send_plans.get(e.room)
            if plan is not None:
                plan.bytes_posted += e.nbytes
            if e.room in tracked:
                continue
            tracked.add(e.room)
            room = self.m.table.get(e.room)
            if room is None:
                continue
            with room.lock:
                if room.live:
                    handles = self.handles.get(room.id)
                    if handles is None:
                        handles = []
                        self.handles.put_locked(room, handles)
                    handles.append(transfer)
        if state == "DONE":
            self._done(transfer)
        else:
            self.active.append(transfer)

    def _done(self, transfer: Transfer) -> None:
        """A transfer is DONE: its bytes are in decode's memory; count its WRITEs, then say so (WRITTEN).

        Counting first decides each room's state before decode hears of the bytes: a room
        that commits alone and turned Success here is committed in this WRITTEN (its last
        entry here, the room's last announcement on the link, is marked commit), and one
        that Failed meanwhile never is.  Any COMMIT the counts decided goes later in the
        turn (``send_commits``), after this WRITTEN.
        """
        self.m.agent.release(transfer)
        committed: set[int] = set()
        for room_id, ends_room in transfer.rooms:
            room = self.m.table.get(room_id)
            if room is None or transfer.peer not in room.peers:
                continue
            self.m.fire(room, Event.COMPLETE, chunks=1, aux=ends_room)
            if room.state is KVPoll.Success:  # final: no thread can change it back
                verdict = self.verdicts.get(room_id)
                if verdict is not None and verdict.alone:
                    committed.add(room_id)
        peer = self.by_agent.get(transfer.peer)
        if peer is not None:
            announce = transfer.announce
            if committed:  # each committed room's last notification here
                last = {room: i for i, (room, _) in enumerate(transfer.rooms)}
                announce = mark_commits(announce, (last[room] for room in committed))
            self.server.send(peer.identity, "written", payload=announce)

    def _fault(self, rooms: list[int], peer: DecodePeer, exc: BaseException, what: str, now: float) -> None:
        """A NIXL call for ``rooms`` failed: lose the peer, or fail those rooms (re-raise a bug)."""
        error = classify(exc, f"{what} to {peer.agent}")  # one call for many rooms: name none of them
        if error is None:
            raise exc  # a bug, not a transport fault
        if isinstance(error, PeerLostError):
            self.peer_lost(peer, error, now)
            return
        for room_id in rooms:
            room = self.m.table.get(room_id)
            if room is not None:
                mine = for_room(error, room_id)
                self.react(room, Input.WRITE_ERROR, peer.agent, reason=str(mine), error=mine)

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
                if peer is not None:
                    self._fault(sorted(t.room_ids), peer, exc, "WRITE", now)
                continue
            if state == "DONE":
                self._done(t)
            else:
                still.append(t)
        self.active = [t for t in still if not t.released]

    def _poll_draining(self) -> None:
        for room_id, (peers, reason, transfers) in list(self.draining.items()):
            if all(t.released for t in transfers):
                del self.draining[room_id]
                for agent in peers:
                    self._notify_failed(agent, room_id, reason)
