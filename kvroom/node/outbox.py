"""Prefill's outbox: the WRITEs of one worker turn, joined into few NIXL transfers.

On host memory NIXL copies inside ``transfer()``, and every transfer carries
~25 us of fixed work beside its copy (two descriptor lists, a request, its
polling and its release; measured in ``benchmarks/README.md``).
A forward batch ends with one ``send()`` per request, so chunks arrive in
bursts: the worker plans every queued chunk, and the outbox joins the WRITEs
bound for the same decode agent and memory kinds into one transfer (up to
``max_bytes``, ``max_writes`` or ``max_rows`` descriptor rows: per-token rows of
interleaved head slices must not pile up into one giant list), whose one
WRITTEN message lists each WRITE's notification
(``;``-separated, :func:`~kvroom.transport.notif.parse_notifs`).  Decode counts
every entry as if it had come alone.  A lone chunk is posted alone, in the same
worker turn: batching never waits for more work.  Chunks into a route with one
memory-kind pair (the common case) are not even planned one by one: their
index pairs are joined and planned in one numpy pass when the batch is posted
(:func:`~kvroom.planning.join_indices`); a bad index found then is traced back
to its rooms by planning each alone (:meth:`Batch.split`).

What joining costs: the rooms of one transfer share its fate.  A WRITE error
fails each room in it (a fault of the peer fails them all anyway), and a room
that fails while a shared transfer is in flight drains until that transfer is
DONE before decode is told.

Pure bookkeeping (no NIXL): :class:`PrefillSide` posts what :meth:`Outbox.add`
and :meth:`Outbox.take` hand back, after dropping the entries of rooms that
failed meanwhile (:meth:`Batch.keep`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from kvroom.node.shares import ChunkWrite, DeferredWrite
from kvroom.planning import ChunkIndices, PairRoute, join_indices
from kvroom.transport.descriptors import DescArray

__all__ = ["MAX_BATCH_BYTES", "MAX_BATCH_ROWS", "MAX_BATCH_WRITES", "Batch", "Entry", "Outbox"]

MAX_BATCH_BYTES = 32 << 20  # ~5 ms of copy here: a batch's first room waits at most that for the rest
MAX_BATCH_WRITES = 64
MAX_BATCH_ROWS = 1 << 16  # descriptor rows per side: what one chunk of per-token rows may take alone


class Entry(NamedTuple):
    """One WRITE inside a batch: planned rows, or indices its batch's route plans."""

    room: int
    ends_room: bool  # the room's final WRITE to this agent (its completion carries the aux flag)
    nbytes: int
    rows: int  # descriptor rows per side (at most, for a deferred entry)
    notif: bytes
    local: DescArray | None
    remote: DescArray | None
    indices: ChunkIndices | None = None  # planned at post time, joined with the batch's others
    route: PairRoute | None = None


@dataclass
class Batch:
    """WRITEs for one decode agent and one memory-kind pair, to post as one transfer."""

    agent: str
    local_mem: str
    remote_mem: str
    entries: list[Entry] = field(default_factory=list)
    nbytes: int = 0
    nrows: int = 0  # descriptor rows per side (an upper bound where entries are deferred)

    def append(self, entry: Entry) -> None:
        """Add one WRITE, counting its bytes and rows."""
        self.entries.append(entry)
        self.nbytes += entry.nbytes
        self.nrows += entry.rows

    def _with(self, entries: list[Entry]) -> Batch:
        """A batch for the same agent and memory kinds holding ``entries``."""
        batch = Batch(self.agent, self.local_mem, self.remote_mem)
        for e in entries:
            batch.append(e)
        return batch

    def keep(self, live: Callable[[int], bool]) -> Batch:
        """The batch without the entries of rooms for which ``live(room)`` is false."""
        kept = [e for e in self.entries if live(e.room)]
        return self if len(kept) == len(self.entries) else self._with(kept)

    def rows(self) -> tuple[DescArray, DescArray]:
        """The joined descriptor rows, local and remote (row ``i`` of one is copied to ``i`` of the other).

        Raises ValueError when a deferred entry's index falls outside a region.
        """
        locals_: list[DescArray] = []
        remotes: list[DescArray] = []
        by_route: dict[int, tuple[PairRoute, list[ChunkIndices]]] = {}
        for e in self.entries:
            if e.local is not None and e.remote is not None:
                locals_.append(e.local)
                remotes.append(e.remote)
            elif e.route is not None and e.indices is not None:
                by_route.setdefault(id(e.route), (e.route, []))[1].append(e.indices)
        for route, chunks in by_route.values():
            plan = route.writes(join_indices(chunks, route.item_bytes))
            for part in plan.parts if plan is not None else ():
                locals_.append(part.local)
                remotes.append(part.remote)
        if len(locals_) == 1:
            return locals_[0], remotes[0]
        return np.concatenate(locals_), np.concatenate(remotes)

    def split(self) -> tuple[Batch, list[tuple[int, ValueError]]]:
        """The entries of rooms whose every entry plans, and each room with one that does not, with why.

        A failing room's other entries are left out too: the room fails, so none
        of its bytes may be posted.
        """
        bad: list[tuple[int, ValueError]] = []
        for e in self.entries:
            try:
                self._with([e]).rows()
            except ValueError as exc:
                if all(room != e.room for room, _ in bad):
                    bad.append((e.room, exc))
        failed = {room for room, _ in bad}
        return self._with([e for e in self.entries if e.room not in failed]), bad

    @property
    def notif(self) -> bytes:
        """Every entry's notification, in one (the payload of its WRITTEN)."""
        return b";".join(e.notif for e in self.entries)

    @property
    def rooms(self) -> tuple[tuple[int, bool], ...]:
        """``(room, ends_room)`` per entry, as :class:`~kvroom.transport.nixl.Transfer` keeps them."""
        return tuple((e.room, e.ends_room) for e in self.entries)


class Outbox:
    """Planned WRITEs waiting for the end of the worker's turn (one thread: the worker)."""

    def __init__(
        self,
        max_bytes: int = MAX_BATCH_BYTES,
        max_writes: int = MAX_BATCH_WRITES,
        max_rows: int = MAX_BATCH_ROWS,
    ) -> None:
        if max_bytes <= 0 or max_writes <= 0 or max_rows <= 0:
            raise ValueError(
                f"outbox limits must be positive, got {max_bytes} bytes, {max_writes} writes, {max_rows} rows"
            )
        self.max_bytes = max_bytes
        self.max_writes = max_writes
        self.max_rows = max_rows
        self._open: dict[tuple[str, str, str], Batch] = {}

    def __len__(self) -> int:
        return sum(len(b.entries) for b in self._open.values())

    def add(
        self, agent: str, write: ChunkWrite | DeferredWrite, notif: bytes, room: int, ends_room: bool
    ) -> Batch | None:
        """Queue one WRITE; returns its batch when that is full (post it now)."""
        key = (agent, write.local_mem, write.remote_mem)
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = Batch(*key)
        if isinstance(write, DeferredWrite):
            entry = Entry(
                room, ends_room, write.nbytes, write.rows, notif, None, None, write.indices, write.route
            )
        else:
            nbytes, rows = int(write.local[:, 1].sum()), int(write.local.shape[0])
            entry = Entry(room, ends_room, nbytes, rows, notif, write.local, write.remote)
        if batch.entries and batch.nrows + entry.rows > self.max_rows:  # post what waits, start afresh
            self._open[key] = batch._with([entry])
            return batch
        batch.append(entry)
        if (
            batch.nbytes >= self.max_bytes
            or len(batch.entries) >= self.max_writes
            or batch.nrows >= self.max_rows
        ):
            del self._open[key]
            return batch
        return None

    def take(self) -> list[Batch]:
        """Every open batch, oldest first; the outbox is empty after."""
        batches = list(self._open.values())
        self._open.clear()
        return batches

    def drop(self, agent: str) -> int:
        """Forget what waits for ``agent`` (it was lost); returns how many WRITEs."""
        keys = [k for k in self._open if k[0] == agent]
        return sum(len(self._open.pop(k).entries) for k in keys)
