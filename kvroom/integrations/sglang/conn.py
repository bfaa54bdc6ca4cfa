"""SGLang's sender and receiver contracts over kvroom rooms.

Translations (SGLang's convention -> kvroom's):

- ``init(num_kv_indices)`` counts the pages *after* decode's prefix, kvroom's
  ``init`` every page of the request: the sender adds the prefix, and the first
  ``send`` prepends that many placeholder pages, which kvroom skips (it writes
  only pages past the prefix decode announced).  ``pop_decode_prefix_len()``
  returns the prefix in tokens.
- aux: the request's metadata row index goes to kvroom as its aux index; kvroom
  writes that row of every metadata buffer straight into decode's buffers with
  the last chunk and reports Success only after it landed and prefill
  committed.  (With ``KVROOM_STAGING_PAGES`` the tensor pool has one aux slot:
  the rows are packed into it before the last chunk and unpacked on Success.)
- state: ``send(kv_indices, state_indices)`` and ``send_metadata(...,
  state_indices)`` take SGLang's list aligned with ``KVArgs.state_types``; it
  becomes kvroom's ``{space: indices}`` (mamba rows, sliding-window pages),
  written with the last chunk and covered by the room's cleanup.
- ``failure_exception()`` raises SGLang's ``KVTransferError`` with kvroom's cause
  chained (``__cause__``) and named in ``failure_reason``; for a room still live
  here (another rank failed it: the polls are MIN-reduced) it aborts the room
  and sets ``is_from_another_rank``.  The room's state is already clean when a
  Failed room's exception is raised.
- ``clear()`` may be called again; on a room still live it aborts it (the room
  then fails and cleans itself, on decode only once no WRITE can land).
- ``poll()`` never raises transport errors; after ``clear()`` it returns the
  last verdict.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from sglang.srt.disaggregation.base.conn import BaseKVReceiver, BaseKVSender, KVTransferMetric
from sglang.srt.disaggregation.common.conn import KVTransferError

from kvroom.errors import KVRoomError
from kvroom.fsm import KVPoll
from kvroom.handle import RoomHandle
from kvroom.integrations.sglang.bootstrap import KvroomKVBootstrapServer
from kvroom.integrations.sglang.manager import KvroomKVManager
from kvroom.integrations.sglang.regions import STATE_SPACES, Unsupported
from kvroom.receiver import KVReceiver
from kvroom.sender import KVSender

__all__ = ["KvroomKVBootstrapServer", "KvroomKVManager", "KvroomKVReceiver", "KvroomKVSender"]

_TERMINAL = (KVPoll.Success, KVPoll.Failed)


def state_indices_by_space(kv_args: Any, state_indices: Any) -> dict[str, np.ndarray] | None:
    """SGLang's ``state_indices`` (one entry per ``KVArgs.state_types``) as kvroom's ``{space: indices}``."""
    if state_indices is None:
        return None
    kinds = [str(getattr(t, "value", t)) for t in (getattr(kv_args, "state_types", None) or [])]
    if len(state_indices) != len(kinds):
        raise ValueError(f"{len(state_indices)} state index lists for state types {kinds}")
    out: dict[str, np.ndarray] = {}
    for kind, indices in zip(kinds, state_indices, strict=True):
        if indices is None:
            continue
        if kind not in STATE_SPACES:
            raise Unsupported(f"kvroom's SGLang backend does not transfer {kind!r} state")
        if isinstance(indices, list | tuple):
            parts = [np.asarray(x, dtype=np.int64).reshape(-1) for x in indices]
            flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        else:
            flat = np.asarray(indices, dtype=np.int64).reshape(-1)
        out[STATE_SPACES[kind]] = flat
    return out or None


class _Room:
    """What the sender and receiver share: a latched local failure, poll, failure_exception, clear."""

    kv_mgr: KvroomKVManager
    bootstrap_room: int
    conclude_state: KVPoll | None
    _handle: RoomHandle | None
    _latched: str | None
    _cleared: bool

    def _start(self, mgr: KvroomKVManager, bootstrap_room: int) -> None:
        self.kv_mgr = mgr
        self.bootstrap_room = int(bootstrap_room)
        self.conclude_state = None
        self._handle = None
        self._latched = None
        self._cleared = False

    def _latch(self, reason: str) -> None:
        """Fail this request before or without a kvroom room (bad bootstrap, duplicate id)."""
        self._latched = reason
        self.conclude_state = KVPoll.Failed

    def _state(self) -> KVPoll:
        if self._latched is not None:
            return KVPoll.Failed
        if self._handle is None:
            return KVPoll.Bootstrapping
        if self._cleared:
            return self.conclude_state or KVPoll.Failed
        state = self._handle.poll()
        if state in _TERMINAL:
            self.conclude_state = state
        return state

    def poll_pp_consensus(self) -> KVPoll:
        """Same as ``poll()``: kvroom's verdict already is one per room across ranks."""
        return self.poll()  # type: ignore[attr-defined,no-any-return]

    def failure_exception(self) -> None:
        """Raise SGLang's ``KVTransferError`` carrying kvroom's cause."""
        room = self.bootstrap_room
        if self._latched is not None:
            raise KVTransferError(room, self._latched)
        handle = self._handle
        if handle is not None and handle.room.state is KVPoll.Failed:
            try:
                handle.failure_exception()
            except BaseException as cause:
                raise KVTransferError(room, f"{type(cause).__name__}: {cause}") from cause
        if handle is not None and not self._cleared and handle.room.state is not KVPoll.Success:
            handle.abort("failed on another rank")  # type: ignore[attr-defined]
        raise KVTransferError(room, "the transfer failed on another rank", is_from_another_rank=True)

    def clear(self) -> None:
        """Drop the room; safe to call again.  A room still live is aborted."""
        handle = self._handle
        if self._cleared or handle is None:
            self._cleared = True
            return
        state = handle.room.state
        if state in _TERMINAL:
            self.conclude_state = state
            handle.clear()
        else:
            handle.abort("cleared by the scheduler before a verdict")  # type: ignore[attr-defined]
        self._cleared = True

    def abort(self) -> None:
        """Fail the room (kvroom tells the peer; decode fails once no WRITE can land)."""
        if self._handle is None:
            self._latch("aborted before bootstrap")
        elif not self._cleared:
            self._handle.abort()  # type: ignore[attr-defined]


class KvroomKVSender(_Room, BaseKVSender):  # type: ignore[misc]
    """Prefill's handle on one request (SGLang's ``BaseKVSender`` contract)."""

    def __init__(
        self,
        mgr: KvroomKVManager,
        bootstrap_addr: str,
        bootstrap_room: int,
        req_has_disagg_prefill_dp_rank: bool = False,
    ) -> None:
        self._start(mgr, bootstrap_room)
        self.bootstrap_addr = bootstrap_addr
        self._num_pages: int | None = None
        self._aux_index: int | None = None
        self._prefix_pages = 0
        self._sent = 0
        self._bytes = 0
        self._started_at: float | None = None
        self._done_at: float | None = None
        try:
            self._handle = self._tx = KVSender(mgr.kv, None, self.bootstrap_room)
        except KVRoomError as exc:  # a duplicate live room id: fail this request, not the scheduler
            self._latch(f"{type(exc).__name__}: {exc}")
            return
        if mgr.must_register_dp_rank(req_has_disagg_prefill_dp_rank):
            mgr.register_dp_rank(self.bootstrap_room)

    def pop_decode_prefix_len(self) -> int:
        """Tokens decode already holds (known once the room left Bootstrapping)."""
        if self._handle is None:
            return 0
        pages = self.kv_mgr.kv.table.decode_prefix_lens.get(self.bootstrap_room) or 0
        self._prefix_pages = int(pages)
        return self._prefix_pages * self.kv_mgr.page_size

    def init(self, num_kv_indices: int, aux_index: int | None = None) -> None:
        """Declare the pages to send (after decode's prefix) and the metadata row."""
        if self._handle is None:
            return
        if not self._prefix_pages:
            self.pop_decode_prefix_len()
        self._num_pages = int(num_kv_indices)
        self._aux_index = aux_index
        self._tx.init(self._num_pages + self._prefix_pages, aux_index)

    def should_send_kv_chunk(self, num_pages: int, last_chunk: bool) -> bool:
        """An empty last chunk must still be sent: it completes the room and carries aux."""
        return num_pages > 0 or last_chunk

    def send(self, kv_indices: Any, state_indices: Any = None, num_kv_tokens: int | None = None) -> None:
        """Send the next chunk of page indices (pages after decode's prefix), state with the last."""
        state = state_indices_by_space(self.kv_mgr.kv_args, state_indices)
        if self._handle is None or self._num_pages is None:
            return
        pages = np.asarray(kv_indices, dtype=np.int64).reshape(-1)
        count = int(pages.size)
        if count == 0 and self._started_at is not None and self._sent == self._num_pages:
            return  # an empty chunk after the one that completed the pages: nothing left to say
        if self._sent == 0 and self._prefix_pages:  # placeholders kvroom skips: distinct, not in the chunk
            spare = np.setdiff1d(np.arange(self._prefix_pages + count, dtype=np.int64), pages)
            pages = np.concatenate([spare[: self._prefix_pages], pages])
        aux = self.kv_mgr.aux
        if self._sent + count == self._num_pages and self._aux_index is not None and aux is not None:
            aux.pack(self._aux_index)
        if self._started_at is None:
            self._started_at = time.monotonic()
        self._tx.send(pages, state_indices=state)
        self._sent += count
        self._bytes += count * self.kv_mgr.page_bytes

    def poll(self) -> KVPoll:
        """The room's state; never raises transport errors."""
        state = self._state()
        if state is KVPoll.Success and self._done_at is None:
            self._done_at = time.monotonic()
        return state

    def get_transfer_metric(self) -> KVTransferMetric:
        """Seconds from the first chunk to Success, and KV bytes handed to kvroom."""
        latency = None
        if self._started_at is not None and self._done_at is not None:
            latency = self._done_at - self._started_at
        return KVTransferMetric(transfer_latency_s=latency, transfer_total_bytes=self._bytes)

    def mark_prefill_complete(self) -> None:
        """Nothing to publish: kvroom sends as chunks arrive (allocation policy "early")."""


class KvroomKVReceiver(_Room, BaseKVReceiver):  # type: ignore[misc]
    """Decode's handle on one request (SGLang's ``BaseKVReceiver`` contract)."""

    require_staging = False

    def __init__(self, mgr: KvroomKVManager, bootstrap_addr: str, bootstrap_room: int | None = None) -> None:
        self._start(mgr, bootstrap_room or 0)
        self.bootstrap_addr = bootstrap_addr
        self.bootstrap_infos: list[dict[str, Any]] = []
        self.abort_notified = False
        self._aux_index: int | None = None
        self._unpacked = False

    def init(self, prefill_dp_rank: int = 0) -> None:
        """Find the prefill ranks (SGLang's bootstrap server) and start kvroom's handshake."""
        if self._handle is not None or self._latched is not None:
            return
        try:
            addrs = self.kv_mgr.prefill_rank_addresses(self.bootstrap_addr, int(prefill_dp_rank or 0))
            self._handle = self._rx = KVReceiver(self.kv_mgr.kv, addrs, self.bootstrap_room)
        except (KVRoomError, ConnectionError, NotImplementedError, OSError) as exc:
            self._latch(f"{type(exc).__name__}: {exc}")
            return
        self.bootstrap_infos = [
            {"rank_ip": a.rsplit(":", 1)[0], "rank_port": a.rsplit(":", 1)[1]} for a in addrs
        ]
        self._rx.init()

    def send_metadata(
        self,
        kv_indices: Any,
        aux_index: int | None = None,
        state_indices: Any = None,
        decode_prefix_len: int | None = None,
        destination: Any = None,
    ) -> None:
        """Tell prefill which pages (after ``decode_prefix_len`` tokens) and which metadata row to fill."""
        state = state_indices_by_space(self.kv_mgr.kv_args, state_indices)
        if destination is not None and getattr(destination, "value", destination) != "device":
            raise Unsupported("kvroom's SGLang backend does not receive into host destinations yet")
        if self._handle is None:
            return
        self._aux_index = aux_index
        self._rx.send_metadata(
            np.asarray(kv_indices, dtype=np.int64),
            aux_index=aux_index,
            decode_prefix_len=decode_prefix_len or 0,
            state_indices=state,
        )

    def poll(self) -> KVPoll:
        """The room's state; Success only with the metadata row copied into SGLang's buffers."""
        state = self._state()
        if state is KVPoll.Success and not self._unpacked:
            aux = self.kv_mgr.aux
            if self._aux_index is not None and aux is not None:
                aux.unpack(self._aux_index)
            self._unpacked = True
        return state

    def fail(self, reason: str) -> None:
        """Fail the room with ``reason`` from any thread (a refused rebootstrap); no-op once it ended."""
        if self._handle is None:
            self._latch(reason)
        elif not self._cleared and self._handle.room.state not in _TERMINAL:
            self._rx.abort(reason)

    def ensure_abort_notified(self, *, force_arm: bool = False) -> None:
        """Nothing to arm: a kvroom room is Failed only once no WRITE can still land."""

    def is_abort_release_safe(self) -> bool:
        """True once the room holds nothing in kvroom (its pages are reusable)."""
        return not self.kv_mgr.kv.footprint(self.bootstrap_room)
