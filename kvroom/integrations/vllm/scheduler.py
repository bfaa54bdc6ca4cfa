"""The scheduler side of the kvroom connector: which rooms to open, when blocks are free.

Prefill (``kv_producer``): a request with ``do_remote_decode`` and a room
finishes; :meth:`RoomScheduler.request_finished` keeps its blocks
(``delay_free``) and asks the workers to send them into the room.  The
blocks stay held until a worker reports the room terminal (Success, or
Failed with every WRITE from them finished or abandoned): ``finished_sending``.

Decode (``kv_consumer``): a request with ``do_remote_prefill``, a room and
prefill's addresses matches every prompt token past its local prefix hit,
asynchronously; once blocks are allocated the workers open the room with the
blocks after that hit (prefill skips the hit).  ``finished_recving`` ends
the wait; a failed room is in ``failed_recving`` too, so vLLM's
``kv_load_failure_policy`` decides ("fail": FINISHED_ERROR, "recompute":
prefill locally).  The flag is cleared once acted on, so a recompute never
waits for remote KV again.  A request aborted while its room is open gets its
room aborted; vLLM keeps its blocks until the room reports, i.e. until no
WRITE into them can land.  One that ends before its room opened (aborted while
it waited to be scheduled) still tells prefill, whose room fails at once.

A room's KV reaches only its request: prefill refuses a room id one of its
requests still holds (the second request gets no ``kv_transfer_params``, so a
router cannot send its decode into the first request's room), and both sides
give their request's fingerprint (token count and a hash of the prompt's token
ids, :func:`kvroom.request_fingerprint`) with the room, so a decode whose
prompt differs from prefill's fails the room on both sides before any byte moves.

Plain Python over vLLM's request objects (duck-typed); no transport here.
"""

from __future__ import annotations

from typing import Any

import structlog

from kvroom.fingerprint import request_fingerprint
from kvroom.integrations.vllm.metadata import KVRoomHandshake, KVRoomMetadata, RecvJob, SendJob
from kvroom.integrations.vllm.params import RemotePrefill, decode_params, remote_decode_room, remote_prefill

__all__ = ["RoomScheduler"]

_log = structlog.get_logger("kvroom.vllm")

# vLLM's RequestStatus names of a request that finished normally (its KV is complete)
_COMPLETED = {"FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED"}


def _pages(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def _fingerprint(request: Any) -> str | None:
    """The request's prompt fingerprint (None for a prompt given as embeddings)."""
    ids = getattr(request, "prompt_token_ids", None)
    return None if ids is None else request_fingerprint(ids)


class RoomScheduler:
    """Per-request connector state of one vLLM scheduler; empty when no room is open.

    ``producer``: prefill (True) or decode (False).  ``bootstrap_addr``: the
    prefill workers' kvroom addresses, rank order, returned to the router in
    a finished request's params (learned from the workers' handshake metadata
    when not configured).
    """

    def __init__(self, producer: bool, block_size: int, bootstrap_addr: tuple[str, ...] = ()) -> None:
        self.producer = producer
        self.block_size = block_size
        self.bootstrap_addr = bootstrap_addr
        self.sending: dict[str, int] = {}  # prefill: req id -> room whose blocks we hold
        self.rooms: dict[int, str] = {}  # prefill: room -> the req id holding it (sending, inverted)
        self.receiving: dict[str, int] = {}  # decode: req id -> open room
        self.cancelling: set[str] = set()  # decode: receives aborted, not yet reported
        self.jobs = KVRoomMetadata()

    # -- handshake --------------------------------------------------------------

    def set_handshake(self, metadata: dict[int, Any]) -> None:
        """Learn the workers' bootstrap addresses (``tp_rank -> KVRoomHandshake``)."""
        addrs = [m.bootstrap_addr for _, m in sorted(metadata.items()) if isinstance(m, KVRoomHandshake)]
        if addrs and all(addrs):
            self.bootstrap_addr = tuple(addrs)

    # -- decode -----------------------------------------------------------------

    def matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Decode: every prompt token past the local hit comes from prefill, asynchronously."""
        if self.producer or remote_prefill(request.kv_transfer_params) is None:
            return 0, False
        count = len(request.prompt_token_ids or ()) - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """Decode: open the room into the blocks past the local hit (once per request)."""
        params = request.kv_transfer_params
        remote = None if self.producer else remote_prefill(params)
        if remote is None:
            return
        params["do_remote_prefill"] = False  # acted on: a retry or recompute prefills locally
        if num_external_tokens <= 0:  # nothing to receive: prefill's room need not wait for us
            self._forgo(request, remote)
            return
        prompt = len(request.prompt_token_ids or ())
        prefix_pages = (prompt - num_external_tokens) // self.block_size
        (block_ids,) = blocks.get_block_ids()
        pages = tuple(block_ids[prefix_pages : _pages(prompt, self.block_size)])
        req_id = request.request_id
        self.receiving[req_id] = remote.room
        prefix = prefix_pages * self.block_size
        job = RecvJob(req_id, remote.room, remote.bootstrap_addr, pages, prefix, _fingerprint(request))
        self.jobs.recvs.append(job)

    # -- both -------------------------------------------------------------------

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Prefill: hold the blocks and send them; decode: abort an open room."""
        req_id = request.request_id
        if not self.producer:
            if req_id in self.receiving:
                if req_id not in self.cancelling:
                    self.cancelling.add(req_id)
                    self.jobs.cancels.append(req_id)
            else:  # ended before its receive opened (aborted while it waited to be scheduled)
                remote = remote_prefill(request.kv_transfer_params)
                if remote is not None:  # not acted on yet
                    request.kv_transfer_params["do_remote_prefill"] = False
                    self._forgo(request, remote)
            return False, None  # vLLM itself keeps a receiving request's blocks until it reports
        room = remote_decode_room(request.kv_transfer_params)
        if room is None:
            return False, None
        holder = self.rooms.get(room)
        if holder is not None and holder != req_id:  # the room is another request's: answer nothing
            _log.warning("kvroom.vllm.room_in_use", room=room, req_id=req_id, held_by=holder)
            return False, None
        needed = _pages(request.num_prompt_tokens, self.block_size)
        if request.status.name not in _COMPLETED or len(block_ids) < needed:
            self.jobs.sends.append(SendJob(req_id, room, ()))  # fail the room now: decode hears at once
            return False, None
        self.sending[req_id] = room
        self.rooms[room] = req_id
        self.jobs.sends.append(SendJob(req_id, room, tuple(block_ids[:needed]), _fingerprint(request)))
        return True, decode_params(room, self.bootstrap_addr)

    def _forgo(self, request: Any, remote: RemotePrefill) -> None:
        """Decode: ``request`` will never receive room ``remote.room``; have the workers abort it.

        Prefill may hold the room already (its request came first); an abort from us
        fails it there at once instead of at its Bootstrapping deadline.
        """
        job = RecvJob(request.request_id, remote.room, remote.bootstrap_addr, (), 0, _fingerprint(request))
        self.jobs.recvs.append(job)

    def build_meta(self) -> KVRoomMetadata:
        """This step's jobs for the workers (the scheduler forgets them)."""
        jobs, self.jobs = self.jobs, KVRoomMetadata()
        return jobs

    def update(self, output: Any) -> None:
        """Forget rooms the workers reported terminal."""
        for req_id in output.finished_sending or ():
            room = self.sending.pop(req_id, None)
            if room is not None and self.rooms.get(room) == req_id:
                del self.rooms[room]
        for req_id in output.finished_recving or ():
            self.receiving.pop(req_id, None)
            if req_id in self.cancelling:
                self.cancelling.discard(req_id)
                if req_id in self.jobs.cancels:  # reported before the abort went out
                    self.jobs.cancels.remove(req_id)

    def held_count(self) -> int:
        """Requests whose blocks this scheduler keeps for an open room (sending or receiving)."""
        return len(self.sending) + len(self.receiving)

    def pending(self) -> bool:
        """Work that must keep vLLM's engine loop stepping."""
        return bool(self.sending or self.receiving or not self.jobs.empty())

    def held(self, req_id: str) -> list[str]:
        """Which of this scheduler's stores still hold ``req_id`` (empty when clean)."""
        stores = {"sending": self.sending, "receiving": self.receiving, "cancelling": self.cancelling}
        found = [name for name, store in stores.items() if req_id in store]
        jobs = self.jobs
        if (
            any(j.req_id == req_id for j in jobs.sends)
            or any(j.req_id == req_id for j in jobs.recvs)
            or req_id in jobs.cancels
        ):
            found.append("jobs")
        return found
