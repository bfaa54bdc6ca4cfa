"""``KVSender``: the prefill scheduler's handle on one room."""

from __future__ import annotations

from typing import Any

from kvroom.errors import RoomStateError
from kvroom.fingerprint import check_fingerprint
from kvroom.fsm import Event, KVPoll, Role
from kvroom.handle import RoomHandle
from kvroom.manager import KVManager
from kvroom.node.prefill import PrefillSide, SendPlan
from kvroom.node.shares import state_rows
from kvroom.protocol import Input
from kvroom.transport.descriptors import validate_pages

__all__ = ["KVSender"]


class KVSender(RoomHandle):
    """Sends one request's KV pages to decode (method names follow SGLang).

    Creating it creates the room (Bootstrapping); it becomes WaitingForInput
    once every decode rank's page list arrived: as many as decode runs
    tensor-parallel ranks, or ``required_dst_info_num`` when given (a
    mismatch fails the room).  Then ``init()`` and ``send()`` per chunk.
    ``fingerprint``: the request the room is for (:func:`kvroom.request_fingerprint` of its
    prompt); a decode page list that names another request fails the room on both sides
    before any byte moves (:class:`~kvroom.errors.RequestMismatchError`).
    ``send()`` and ``poll()`` never raise transport errors: a fault shows as
    ``poll() == KVPoll.Failed`` and ``failure_exception()`` returns its cause.
    """

    def __init__(
        self,
        manager: KVManager,
        bootstrap_addr: str | None,
        bootstrap_room: int,
        required_dst_info_num: int | None = None,
        *,
        fingerprint: str | None = None,
    ) -> None:
        if manager.role is not Role.SENDER:
            raise ValueError("KVSender needs a prefill manager")
        if required_dst_info_num is not None and (
            isinstance(required_dst_info_num, bool)
            or not isinstance(required_dst_info_num, int)
            or required_dst_info_num <= 0
        ):
            raise ValueError(f"required_dst_info_num must be a positive int, got {required_dst_info_num!r}")
        check_fingerprint(fingerprint)
        self.manager = manager
        self.bootstrap_addr = bootstrap_addr
        self.room = manager.create_room(bootstrap_room)
        self._side: PrefillSide = manager.side
        room = self.room
        if fingerprint is not None:
            self._side.fingerprints.put(room, fingerprint)
        if required_dst_info_num is not None:
            with room.lock:
                room.infos_needed = required_dst_info_num
                self._side.dst_counts.put_locked(room, required_dst_info_num)
        manager.submit(lambda: self._side.adopt_pending(room))

    def init(self, num_pages: int, aux_index: int | None = None) -> None:
        """Declare the request's page count and aux row (before the first send).

        ``aux_index`` is one row index into every aux buffer; a pipeline stage
        that holds no aux buffers ignores it.
        """
        aux_rows = self.manager.regions.items("aux")
        if not isinstance(num_pages, int) or isinstance(num_pages, bool):
            raise TypeError(f"num_pages must be an int, got {type(num_pages).__name__}")
        if num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {num_pages}")
        if aux_index is not None and aux_rows is not None and not 0 <= aux_index < aux_rows:
            raise ValueError(f"aux_index {aux_index} out of range for {aux_rows} aux slots")
        if self._side.send_plans.get(self.room.id) is not None:
            raise RoomStateError(
                self.room.id, "sender", self.room.state.name, "init", "init() was already called"
            )
        if self._side.send_plans.put(self.room, SendPlan(num_pages, aux_index)):
            room = self.room
            self.manager.submit(lambda: self._side.check_plan(room))

    def send(self, kv_indices: Any, state_indices: Any = None) -> None:
        """Hand over the next chunk of pages; the last chunk completes ``num_pages``.

        ``state_indices``: the request's state rows (mamba conv/ssm rows,
        sliding-window pages), ``{space: indices}`` or one list when the model
        has one state space; they are written with the last chunk, so give
        them with it (or earlier).  Bad indices raise ValueError/TypeError;
        calling before the room is WaitingForInput, or after Success, raises
        RoomStateError.  On a Failed room it does nothing.
        """
        self.manager.check_alive()
        room = self.room
        state = state_rows(state_indices, self.manager.regions, f"room {room.id}")
        plan = self._side.send_plans.get(room.id)
        if plan is None:
            if room.state is KVPoll.Failed:
                return
            raise RoomStateError(room.id, "sender", room.state.name, "send", "call init() first")
        pages = validate_pages(kv_indices, self.manager.regions.items("kv") or 0, f"room {room.id}")
        with room.lock:
            if plan.sent_pages + pages.size > plan.num_pages:
                raise ValueError(
                    f"room {room.id}: {plan.sent_pages} + {pages.size} pages exceed "
                    f"init(num_pages={plan.num_pages})"
                )
        if not self.manager.fire(room, Event.SEND):
            return  # Failed absorbs it
        with room.lock:
            offset = plan.sent_pages
            plan.sent_pages += pages.size
            if state_indices is not None:
                plan.state = state
            last = plan.sent_pages == plan.num_pages
        self.manager.submit(lambda: self._side.post_chunk(room, pages, offset, last))

    def abort(self, reason: str = "aborted by prefill scheduler") -> None:
        """Fail the room now; decode is told once nothing is in flight.

        On a prefill rank other than rank 0 whose share was already posted, the
        room's verdict belongs to rank 0 (abort every rank, as TP schedulers do):
        this rank then waits for it instead of failing on its own.
        """
        self._side.react(self.room, Input.LOCAL_ABORT, reason=reason)
