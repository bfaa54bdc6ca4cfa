"""Each role's part of a demo node's scheduler loop (:mod:`kvroom.demo.scheduler` runs them).

* :class:`PrefillLoop`: fills its pool's "KV" once at start-up, stamps a
  room's pages when it creates the room's ``KVSender`` (its forward pass),
  calls ``init()`` once decode's page list is in and sends the room's chunks:
  all at once (event-driven) or one a tick (stepping).  In the raw phase it
  runs the WRITE loops of :mod:`kvroom.demo.raw` and :mod:`kvroom.demo.raw_equal`.
* :class:`DecodeLoop`: clears the stamps of the rows a room will receive,
  sends its page list, and on Success checks every byte of the room's pages,
  aux and state rows (:meth:`~kvroom.demo.buffers.DemoBuffers.check`); in the
  raw phase it serves its bare agent's notifications once a loop turn.

With ``NodeOptions.verify`` False (``kvroom demo --no-verify``) prefill
stamps nothing and decode neither clears nor checks: results carry
``verified=None``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from kvroom.demo.scheduler import LiveRoom, SchedulerLoop
from kvroom.demo.workload import RoomSpec

if TYPE_CHECKING:
    from kvroom.receiver import KVReceiver
    from kvroom.sender import KVSender

__all__ = ["PrefillLoop", "DecodeLoop"]


class PrefillLoop(SchedulerLoop["KVSender"]):
    """A prefill scheduler: stamp a room's pages, send its chunks once decode is ready."""

    role = "prefill"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.buffers.prepare()  # the pool's "KV", computed once

    def create(self, spec: RoomSpec, pages: torch.Tensor, slot: int) -> KVSender:
        """A sender for the room; its pages are stamped now (its forward pass)."""
        from kvroom import KVSender

        sender = KVSender(self.m, self.m.bootstrap_addr, spec.room)
        if self.opts.verify:
            self.buffers.stamp(spec.room, spec.pages, spec.prefix_pages, pages, slot)
        return sender

    def advance(self, room_id: int) -> None:
        """Report a terminal room; once decode's page list is in, ``init()`` and send chunks."""
        from kvroom import KVPoll

        entry = self.live[room_id]
        state = entry.handle.poll()
        if state in (KVPoll.Success, KVPoll.Failed):
            self.finish(room_id, None)
            return
        if state is KVPoll.Bootstrapping:
            return
        spec = entry.spec
        if not entry.ready:
            entry.handle.init(spec.pages, aux_index=entry.slot)
            entry.ready = True
        if self.opts.chunk_interval <= 0:  # event-driven: every chunk now
            while entry.sent < spec.pages:
                self.send_chunk(entry)
        elif entry.sent < spec.pages:  # ticks: one chunk per tick
            self.send_chunk(entry)

    def send_chunk(self, entry: LiveRoom[KVSender]) -> None:
        """Send the room's next ``chunk_pages`` pages (with its state rows on the last)."""
        sent, pages = entry.sent, entry.pages
        chunk = pages[sent : sent + self.opts.chunk_pages]
        last = sent + chunk.numel() >= pages.numel()
        state = self.buffers.state_indices(pages, entry.slot) if last else None
        entry.handle.send(chunk, state_indices=state)
        entry.sent = sent + chunk.numel()

    def on_raw(self, kind: str, arg: Any) -> None:
        """``raw_run``: the plain WRITE loop; ``raw_equal``: the one doing decode's checks too."""
        if kind == "raw_run":
            from kvroom.demo.raw import raw_writes

            agent = self.raw_agent()
            try:
                self.conn.send(("raw", raw_writes(agent, **arg)))
            finally:
                agent.close()
        elif kind == "raw_equal" and self.raw is not None:
            from kvroom.demo.raw_equal import equal_work_writes

            group = self.buffers.raw_group
            self.conn.send(("raw", equal_work_writes(self.raw, group.block, group.pattern, **arg)))
        else:
            super().on_raw(kind, arg)


class DecodeLoop(SchedulerLoop["KVReceiver"]):
    """A decode scheduler: send page lists, verify what arrives, free pages on Failed."""

    role = "decode"

    def create(self, spec: RoomSpec, pages: torch.Tensor, slot: int) -> KVReceiver:
        """A receiver for the room (event-driven: its page list goes out now)."""
        from kvroom import KVReceiver

        receiver = KVReceiver(self.m, self.opts.bootstrap_addr, spec.room)
        receiver.init()
        if self.opts.chunk_interval <= 0:
            self.send_metadata(receiver, spec, pages, slot)
        return receiver

    def send_metadata(self, receiver: KVReceiver, spec: RoomSpec, pages: torch.Tensor, slot: int) -> None:
        """Clear the stamps of the rows the room will receive, then send its page list."""
        prefix = spec.prefix_pages
        if self.opts.verify:
            self.buffers.clear(spec.pages, prefix, pages, slot)
        receiver.send_metadata(
            pages[prefix:], aux_index=slot, decode_prefix_len=prefix * self.buffers.page_size,
            state_indices=self.buffers.state_indices(pages, slot),
        )  # fmt: skip

    def advance(self, room_id: int) -> None:
        """On Success check every byte the room received; report it."""
        from kvroom import KVPoll

        entry = self.live[room_id]
        spec, pages = entry.spec, entry.pages
        if not entry.ready:
            entry.ready = True
            if self.opts.chunk_interval > 0:  # stepping: the page list goes out on the first step
                self.send_metadata(entry.handle, spec, pages, entry.slot)
                return
        state = entry.handle.poll()
        if state is KVPoll.Success:
            verified = None
            if self.opts.verify:
                verified = self.buffers.check(spec.room, spec.pages, spec.prefix_pages, pages, entry.slot)
            self.finish(room_id, verified)
        elif state is KVPoll.Failed:
            self.finish(room_id, None)

    def on_raw(self, kind: str, arg: Any) -> None:
        """``raw_peer``: load prefill's agent and check (or not) what its equal-work loop writes."""
        if kind == "raw_peer" and self.raw is not None:
            from kvroom.demo.raw_equal import RoomChecker

            group = self.buffers.raw_group
            self.raw.serve(arg["md"], RoomChecker(group.block, group.pattern, verify=arg["verify"]))
            self.conn.send(("raw", {"peer": True}))
        else:
            super().on_raw(kind, arg)

    def _timeout(self) -> float | None:
        timeout = super()._timeout()
        return 0.001 if self.raw is not None else timeout  # keep the raw agent progressing

    def idle(self) -> None:
        """Progress the raw agent: drop plain notifications, check equal-work rooms."""
        if self.raw is not None:
            self.raw.drain()
