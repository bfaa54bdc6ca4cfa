"""Where each of the demo's rooms is: given to prefill, to its decode, done, lost with a node.

The demo's parent hands rooms out in waves (:meth:`Ledger.submit_wave`):
prefill gets them up to twice ``concurrency`` ahead (it fills their pages
early, as a prefill forward pass would) and their decode nodes up to
``concurrency`` in flight in the whole cluster, so decode's room latency is
not spent queueing.  A room is *done* once every side that still runs
reported a terminal state for it: prefill and its decode, or prefill alone
when its decode node was killed.  Results are taken in incrementally (the
parent's loop runs once per message), so counting stays cheap over
thousands of rooms.
"""

from __future__ import annotations

from kvroom.demo.cluster import Cluster
from kvroom.demo.workload import RoomSpec

__all__ = ["Ledger"]


class Ledger:
    """The rooms of one run and where each one is."""

    def __init__(self, cluster: Cluster, rooms: list[RoomSpec], concurrency: int) -> None:
        self.cluster = cluster
        self.rooms = rooms
        self.concurrency = concurrency
        self.to_prefill: list[RoomSpec] = list(rooms)  # not yet given to prefill
        self.pending: list[RoomSpec] = list(rooms)  # not yet given to a decode
        self.submitted: dict[int, str] = {}  # room -> decode node name it went to
        self.killed: set[str] = set()  # decode nodes killed (their rooms are lost there)
        self.ok = 0  # Success on decode
        self.moved = 0  # bytes of those
        self._seen = 0  # results already counted
        self._prefill_done: set[int] = set()
        self._decode_done: set[int] = set()
        self._decode_open: set[int] = set()  # given to a live decode, not ended there
        self._done: set[int] = set()

    def _count(self) -> None:
        """Take in new results (incrementally: the loop runs once per message)."""
        results = self.cluster.results
        for r in results[self._seen :]:
            if r.role == "prefill":
                self._prefill_done.add(r.room)
                if r.room in self._decode_done or self.submitted.get(r.room) in self.killed:
                    self._done.add(r.room)
            else:
                self._decode_done.add(r.room)
                self._decode_open.discard(r.room)
                if r.room in self._prefill_done:
                    self._done.add(r.room)
                if r.state == "Success":
                    self.ok += 1
                    self.moved += r.bytes
        self._seen = len(results)

    def lost_node(self, name: str) -> None:
        """A decode node was killed: its rooms are done once prefill ended them."""
        self.killed.add(name)
        for room, node in self.submitted.items():
            if node == name:
                self._decode_open.discard(room)
                if room in self._prefill_done:
                    self._done.add(room)

    def done_rooms(self) -> set[int]:
        """Rooms whose every surviving side reported a terminal state."""
        self._count()
        return self._done

    def inflight(self) -> list[int]:
        """Rooms given to a decode and not done yet."""
        done = self.done_rooms()
        return [r for r in self.submitted if r not in done]

    def submit_wave(self) -> None:
        """Top up prefill (twice ``concurrency`` ahead) and the decodes (``concurrency`` in flight)."""
        self._count()
        limit = self.concurrency
        if self.to_prefill:
            room = 2 * limit - (len(self.rooms) - len(self.to_prefill) - len(self._prefill_done))
            if room > 0:
                wave, self.to_prefill = self.to_prefill[:room], self.to_prefill[room:]
                self.cluster.submit_prefill(wave)
        if self.pending:
            given = len(self.rooms) - len(self.to_prefill)  # rooms prefill has
            budget = min(limit - len(self._decode_open), given - len(self.submitted))
            if budget > 0:
                wave, self.pending = self.pending[:budget], self.pending[budget:]
                self.cluster.submit_decodes(wave)
                for spec in wave:
                    self.submitted[spec.room] = self.cluster.decodes[spec.decode].name
                    self._decode_open.add(spec.room)
