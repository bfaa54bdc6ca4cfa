"""Decode's staging ring at work: reservations per room and chunk, prefetch, and the local scatter.

Only a tensor pool (:class:`~kvroom.transport.layout.KVPool`) has a staging
ring: where head slices of a prefill rank and this rank interleave, prefill
WRITEs whole pages of its own layout into a reservation
(:func:`~kvroom.planning.staging_rank`) and :meth:`DecodeStaging._scatter`
copies this rank's heads into the room's pages.  Reservations live in the
``prefetch_requested`` store, so every way a room ends gives the space back.
:class:`DecodeStaging` is the part of :class:`~kvroom.node.decode.DecodeSide`
that does this.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import torch

from kvroom.errors import StagingExhaustedError
from kvroom.fsm import Event
from kvroom.fsm.room import Room
from kvroom.node.decode_verdicts import DecodeVerdicts
from kvroom.node.shares import Source
from kvroom.transport.layout import range_overlap
from kvroom.transport.notif import Notif
from kvroom.transport.staging import (
    Reservation,
    chunk_count,
    chunk_pages,
    scatter_chunk,
)

if TYPE_CHECKING:
    from kvroom.node.decode_state import ReceivePlan

__all__ = ["DecodeStaging"]


class DecodeStaging(DecodeVerdicts):
    """Staging reservations and the scatter, for :class:`~kvroom.node.decode.DecodeSide`."""

    def staging_needs(self, addresses: Sequence[str], num_pages: int) -> dict[tuple[Hashable, ...], int]:
        """Units per ``(chunk, session)`` a room of ``num_pages`` pages needs from these ranks.

        Prefill rank ``i`` of ``len(addresses)`` is assumed to hold an equal
        share of the model's heads (what the handshake later checks).
        """
        if self.m.tensors is None:
            return {}  # only a tensor pool stages
        mine = self.m.tensors.layout
        ranks = len(addresses)
        if mine.total_heads % ranks:
            raise ValueError(f"{mine.total_heads} KV heads do not split over {ranks} prefill ranks")
        per_rank = mine.total_heads // ranks
        size = self.m.config.staging_chunk_pages
        needs: dict[tuple[Hashable, ...], int] = {}
        for rank, address in enumerate(addresses):
            theirs = (rank * per_rank, (rank + 1) * per_rank)
            if range_overlap(theirs, mine.heads) is None or not self._stages(theirs):
                continue
            for c in range(chunk_count(num_pages, size)):
                needs[(c, address)] = chunk_pages(num_pages, size, c) * per_rank * mine.layers
        return needs

    def _stages(self, theirs: tuple[int, int] | None) -> bool:
        """Whether pages of a rank holding ``theirs`` heads go through the ring (tensor pools only)."""
        mode, tensors = self.m.config.transfer_mode, self.m.tensors
        if tensors is None or theirs is None:
            return False
        return mode == "staging" or (mode == "auto" and theirs != tensors.layout.heads)

    def prefetch(self, room_id: int, addresses: Sequence[str], num_pages: int) -> bool:
        """Reserve staging for a room now (it may not exist yet); False when the ring is full."""
        needs = self.staging_needs(addresses, num_pages)
        got: dict[tuple[Hashable, ...], Reservation] = {}
        for key, units in needs.items():
            res = self.ring.alloc(units)
            if res is None:
                for r in got.values():
                    self.ring.release(r)
                return False
            got[(room_id, *key)] = res
        room = self.m.table.get(room_id)
        if room is not None:
            return self._adopt(room, got, num_pages)
        with self._early_lock:
            old = self._early.pop(room_id, None)
            for res in (old[0] if old else {}).values():
                self.ring.release(res)
            if len(self._early) >= self.m.config.pending_limit:
                for res in got.values():
                    self.ring.release(res)
                return False
            self._early[room_id] = (got, num_pages, self.m.clock() + self.m.config.pending_ttl)
        room = self.m.table.get(room_id)  # created meanwhile: hand it over now
        if room is not None:
            self.adopt_prefetch(room)
        return True

    def adopt_prefetch(self, room: Room) -> None:
        """A new room takes over staging reserved before it existed."""
        with self._early_lock:
            entry = self._early.pop(room.id, None)
        if entry is not None:
            self._adopt(room, entry[0], entry[1])

    def _adopt(self, room: Room, got: dict[tuple[Hashable, ...], Reservation], num_pages: int) -> bool:
        """Move reservations into the room's stores; released if the room is gone."""
        with room.lock:
            if room.live and not self.plans.get(room.id):
                for key, res in got.items():
                    old = self.staging.get(key)
                    if old is not None:
                        self.ring.release(old)
                    self.staging.put_locked(room, key, res)
                self.prefetched.put_locked(room, num_pages)
                return True
        for res in got.values():
            self.ring.release(res)
        return False

    def _reservation(self, room: Room, chunk: int, address: str) -> Reservation:
        res = self.staging.get((room.id, chunk, address))
        assert res is not None
        return res

    def _reserve(self, room: Room, plan: ReceivePlan, sources: dict[str, Source]) -> bool:
        """Hold staging for every staged chunk; False when the room must wait (or failed)."""
        needs = {
            (room.id, *key): units
            for key, units in self.staging_needs(list(sources), int(plan.pages.size)).items()
            if sources[str(key[1])].staged
        }
        total = sum(needs.values())
        if total > self.ring.capacity:
            error = StagingExhaustedError(
                f"room {room.id} needs {total} staging units, the ring holds {self.ring.capacity}; "
                "build the decode KVPool with more staging_pages or a smaller staging_chunk_pages"
            )
            self.m.fire(room, Event.TRANSPORT_ERROR, error=error)
            return False
        for key in self.staging.keys_of(room.id):
            res = self.staging.get(key)
            if res is not None and needs.get(key) != res.units:
                self.staging.pop(room, key)  # prefetched for another shape: give it back
        new: list[tuple[Hashable, ...]] = []
        for key, units in needs.items():
            if self.staging.get(key) is not None:
                continue
            res = self.ring.alloc(units)
            if res is None or not self.staging.put(room, key, res):
                if res is not None:
                    self.ring.release(res)
                for k in new:  # never hold part of a room's need while waiting: no deadlock
                    self.staging.pop(room, k)
                if room.live:
                    self.waiting_staging.append(room)
                return False
            new.append(key)
        return True

    def _scatter(self, room: Room, plan: ReceivePlan, src: Source, address: str, n: Notif) -> None:
        """Copy a staged chunk's heads into the room's pages; free the chunk once whole."""
        size = self.m.config.staging_chunk_pages
        chunk = n.start // size
        res = self.staging.get((room.id, chunk, address))
        if res is None:
            return
        tensors = self.m.tensors
        assert src.heads is not None and src.src_heads is not None and tensors is not None
        mine = tensors.layout
        h_lo, h_hi = src.heads
        dst = torch.from_numpy(plan.pages[n.start : n.start + n.npages]).to(self._views[0].device)
        scatter_chunk(
            tensors.staging,
            tensors.staging_unit_bytes,
            res,
            src.src_heads[1] - src.src_heads[0],
            self._views,
            dst,
            n.start - chunk * size,
            slice(h_lo - src.src_heads[0], h_hi - src.src_heads[0]),
            slice(h_lo - mine.heads[0], h_hi - mine.heads[0]),
        )
        got = src.chunk_got.get(chunk, 0) + n.npages
        src.chunk_got[chunk] = got
        if got >= chunk_pages(int(plan.pages.size), size, chunk):
            self.staging.pop(room, (room.id, chunk, address))
