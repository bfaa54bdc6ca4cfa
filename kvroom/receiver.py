"""``KVReceiver``: the decode scheduler's handle on one room."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvroom.errors import RoomStateError
from kvroom.fingerprint import check_fingerprint
from kvroom.fsm import KVPoll, Role
from kvroom.handle import RoomHandle
from kvroom.manager import KVManager
from kvroom.node.decode import DecodeSide, ReceivePlan
from kvroom.node.shares import state_rows
from kvroom.transport.control import parse_addresses
from kvroom.transport.descriptors import validate_pages

__all__ = ["KVReceiver"]


class KVReceiver(RoomHandle):
    """Receives one request's KV pages from prefill (method names follow SGLang).

    Creating it creates the room (Bootstrapping); ``init()`` starts the
    handshake with the prefill at ``bootstrap_addr`` (a list of addresses, one
    per prefill rank, stage-major: PP stage 0's TP ranks in order, then stage
    1's, ...; the first is the room's coordinator); ``send_metadata()`` tells
    prefill where to write.  ``poll()`` turns Failed only once no write for the
    room can still land, so its pages may be reused at once.
    """

    def __init__(self, manager: KVManager, bootstrap_addr: str | Sequence[str], bootstrap_room: int) -> None:
        if manager.role is not Role.RECEIVER:
            raise ValueError("KVReceiver needs a decode manager")
        addresses = parse_addresses(bootstrap_addr)
        self.manager = manager
        self.bootstrap_addr = bootstrap_addr
        self.room = manager.create_room(bootstrap_room, peers=addresses)
        self._side: DecodeSide = manager.side
        self._side.adopt_prefetch(self.room)
        self._started = False

    def init(self) -> None:
        """Start bootstrapping: connect to and greet the prefill peer."""
        if not self._started:
            self._started = True
            room = self.room
            self.manager.submit(lambda: self._side.connect(room))

    def send_metadata(
        self,
        kv_indices: Any,
        aux_index: int | None = None,
        decode_prefix_len: int = 0,
        state_indices: Any = None,
        *,
        fingerprint: str | None = None,
    ) -> None:
        """Tell prefill where to write: pages (after a ``decode_prefix_len``-token prefix), rows.

        ``aux_index``: one row index into every aux buffer.  ``state_indices``:
        this request's state rows (``{space: indices}``, or one list when the
        model has one state space), written with prefill's last chunk.
        ``fingerprint``: the request this room is for (:func:`kvroom.request_fingerprint` of its
        prompt); a prefill that holds another request under this room id fails the room on both
        sides before any byte moves (:class:`~kvroom.errors.RequestMismatchError`).
        """
        self.manager.check_alive()
        regions = self.manager.regions
        room = self.room
        pages = validate_pages(kv_indices, regions.items("kv") or 0, f"room {room.id}")
        aux_rows = regions.items("aux")
        if aux_index is not None and aux_rows is not None and not 0 <= aux_index < aux_rows:
            raise ValueError(f"aux_index {aux_index} out of range for {aux_rows} aux slots")
        if aux_rows is None:  # a pipeline stage without aux buffers: nothing to receive there
            aux_index = None
        state = state_rows(state_indices, regions, f"room {room.id}")
        check_fingerprint(fingerprint)
        page_size = regions.layout.model.page_size
        if not isinstance(decode_prefix_len, int) or decode_prefix_len < 0 or decode_prefix_len % page_size:
            raise ValueError(f"decode_prefix_len must be a non-negative multiple of {page_size}")
        if room.state is KVPoll.Failed:
            return
        if self._side.plans.get(room.id) is not None or room.state is not KVPoll.Bootstrapping:
            raise RoomStateError(
                room.id, "receiver", room.state.name, "send_metadata", "metadata already sent"
            )
        plan = ReceivePlan(pages, aux_index, decode_prefix_len // page_size, state, fingerprint)
        table = self.manager.table
        if not table.put_all([(self._side.plans, plan), (table.decode_prefix_lens, decode_prefix_len)], room):
            return
        self._started = True
        self.manager.submit(lambda: self._side.send_room(room))

    def abort(self, reason: str = "aborted by decode scheduler") -> None:
        """Fail the room; once metadata was sent, only after prefill confirms."""
        room = self.room
        self.manager.submit(lambda: self._side.abort(room, reason))
