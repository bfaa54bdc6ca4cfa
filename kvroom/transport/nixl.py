"""The one place kvroom calls NIXL.

:class:`NixlAgent` owns a ``nixl_agent`` with its progress thread off (an idle
progress thread burns ~0.3 of a core; the manager's loop polls instead), so
it must be used from one thread only: the manager's worker.  Transfers are
wrapped in :class:`Transfer`, which is released exactly once and refuses any
use after release (NIXL handles are freed memory after release).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvroom.errors import BootstrapError
from kvroom.transport.descriptors import DescArray
from kvroom.transport.regions import Region

__all__ = ["NixlAgent", "Transfer", "unique_agent_name"]


def unique_agent_name(role: str) -> str:
    """A name unique to this process incarnation (NIXL refuses re-adding a name)."""
    return f"kvroom-{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass(eq=False)
class Transfer:
    """One posted NIXL transfer: its handle, the WRITEs it carries, and its fate.

    ``rooms`` holds ``(room, ends_room)`` per WRITE joined into it (one entry
    unless prefill's outbox joined several); ``announce`` is what the target
    is told once the transfer is DONE (its WRITEs' notifications).
    """

    rooms: tuple[tuple[int, bool], ...]
    peer: str
    handle: Any
    announce: bytes = b""
    released: bool = field(default=False)

    @property
    def room_ids(self) -> frozenset[int]:
        """The rooms whose bytes it carries."""
        return frozenset(room for room, _ in self.rooms)

    def __repr__(self) -> str:
        rooms = ",".join(str(r) for r in sorted(self.room_ids))
        return f"<Transfer rooms={rooms} writes={len(self.rooms)} peer={self.peer} released={self.released}>"


class NixlAgent:
    """A NIXL agent with ``regions`` registered (raw ``(addr, len, dev)`` lists per memory kind)."""

    def __init__(self, name: str, regions: Sequence[Region], backends: tuple[str, ...] = ("UCX",)) -> None:
        try:
            from nixl._api import nixl_agent, nixl_agent_config

            self._agent = nixl_agent(
                name, nixl_agent_config(enable_prog_thread=False, backends=list(backends))
            )
        except ImportError as exc:
            raise BootstrapError(f"NIXL is not installed ({exc}); pip install nixl") from exc
        except Exception as exc:
            raise BootstrapError(
                f"could not create NIXL agent {name}: {exc}; check the nixl install and NIXL_PLUGIN_DIR"
            ) from exc
        missing = [b for b in backends if b not in self._agent.backends]
        if missing:
            raise BootstrapError(
                f"NIXL backend(s) {', '.join(missing)} unavailable (plugins: {self._agent.plugin_list}); "
                "check the nixl install and NIXL_PLUGIN_DIR"
            )
        self.name = name
        self.regions = tuple(regions)
        self._registered: list[Any] = []
        for mem in sorted({r.mem for r in self.regions}):
            rows = [(r.addr, r.length, r.device, "") for r in self.regions if r.mem == mem]
            try:
                descs = self._agent.register_memory(rows, mem)
            except Exception as exc:
                self.close()
                names = ", ".join(r.name for r in self.regions if r.mem == mem)
                raise BootstrapError(f"NIXL could not register the {mem} regions ({names}): {exc}") from exc
            self._registered.append(descs)
        self.posted = 0  # handles created, for tests and operators
        self.released = 0  # handles released; equals posted once idle

    # -- metadata -------------------------------------------------------------

    def metadata(self) -> bytes:
        """This agent's metadata, for the peer's ``add_remote_agent``."""
        data: bytes = self._agent.get_agent_metadata()
        return data

    def add_remote(self, metadata: bytes) -> str:
        """Load a peer's metadata; returns its agent name."""
        name = self._agent.add_remote_agent(metadata)
        return name.decode() if isinstance(name, bytes) else str(name)

    def remove_remote(self, name: str) -> None:
        """Forget a peer (needed after a disconnect before a new handshake)."""
        try:
            self._agent.remove_remote_agent(name)
        except Exception as exc:  # already gone: nothing to forget
            from kvroom.transport.faults import is_nixl_error

            if not is_nixl_error(exc):
                raise

    # -- transfers ------------------------------------------------------------

    def write(
        self,
        peer: str,
        local: DescArray,
        local_mem: str,
        remote: DescArray,
        remote_mem: str,
        announce: bytes,
        rooms: tuple[tuple[int, bool], ...],
    ) -> tuple[Transfer, str]:
        """Post a WRITE of ``local`` rows into ``remote`` rows; returns (transfer, state).

        ``rooms``: ``(room, ends_room)`` per WRITE the rows carry; ``announce``
        is kept on the transfer for the caller to tell the peer at DONE.  The
        WRITE carries no NIXL notification: with one, DONE would wait for the
        target's own NIXL progress.  Without, DONE needs none of it, and it
        still means the bytes are in the target's memory (NIXL's UCX backend
        flushes every transfer before it reports DONE).
        """
        ldescs = self._agent.get_xfer_descs(np.ascontiguousarray(local), local_mem)
        rdescs = self._agent.get_xfer_descs(np.ascontiguousarray(remote), remote_mem)
        if ldescs is None or rdescs is None:  # NIXL logs and returns None on bad input
            raise ValueError(f"rooms {sorted({r for r, _ in rooms})}: NIXL rejected the descriptor lists")
        handle = self._agent.initialize_xfer("WRITE", ldescs, rdescs, peer)
        self.posted += 1
        transfer = Transfer(rooms, peer, handle, announce)
        try:
            state = self._agent.transfer(handle)
        except BaseException:
            self.release(transfer)
            raise
        return transfer, state

    def state(self, transfer: Transfer) -> str:
        """``"DONE"`` or ``"PROC"``; NIXL faults raise (see :mod:`.faults`)."""
        if transfer.released:
            raise RuntimeError(f"{transfer!r} used after release")
        state: str = self._agent.check_xfer_state(transfer.handle)
        if state == "ERR":
            raise RuntimeError(f"NIXL reported ERR for {transfer!r}")
        return state

    def release(self, transfer: Transfer) -> None:
        """Release the handle once; later calls do nothing."""
        if transfer.released:
            return
        transfer.released = True
        self.released += 1
        try:
            self._agent.release_xfer_handle(transfer.handle)
        except Exception as exc:
            from kvroom.transport.faults import is_nixl_error

            if not is_nixl_error(exc):
                raise

    # -- notifications --------------------------------------------------------

    def notify(self, peer: str, message: bytes) -> None:
        """A notification not bound to a transfer (needs :meth:`progress` calls to go out)."""
        self._agent.send_notif(peer, message)

    def progress(self) -> None:
        """Drive the backend without a progress thread; NIXL's notifications are dropped.

        NIXL progresses its backend only inside its calls: a side with no
        transfer to poll must still call one (connection set-up, a bare
        notification, WRITEs over transports that need the target).  A NIXL
        fault raised here belongs to no transfer and is not raised: the
        transfers' own polls and the peers' heartbeats report it.
        """
        try:
            self._agent.get_new_notifs()
        except Exception as exc:
            from kvroom.transport.faults import is_nixl_error

            if not is_nixl_error(exc):
                raise

    def close(self) -> None:
        """Deregister memory; the agent is freed with this object."""
        for reg in self._registered:
            with contextlib.suppress(Exception):
                self._agent.deregister_memory(reg)
        self._registered = []
