"""The ``kv_transfer_params`` keys the kvroom connector reads and writes.

vLLM request ids are strings chosen by each engine; a kvroom room is an int
that both sides must agree on, so the router puts it in the request's
``kv_transfer_params`` explicitly (``kvroom_room``), next to vLLM's usual
``do_remote_decode`` (prefill) / ``do_remote_prefill`` (decode) flags.  Decode
also needs the prefill ranks' bootstrap addresses (``kvroom_bootstrap_addr``:
one ``host:port`` or a list, one per prefill TP rank in rank order); prefill
returns them in the params of its finished request, so a router can forward
those params to decode unchanged.

Pure: no vLLM or torch imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ROOM",
    "BOOTSTRAP_ADDR",
    "RemotePrefill",
    "remote_decode_room",
    "remote_prefill",
    "decode_params",
]

ROOM = "kvroom_room"
BOOTSTRAP_ADDR = "kvroom_bootstrap_addr"


@dataclass(frozen=True)
class RemotePrefill:
    """What decode needs to receive a request's KV: the room and where prefill listens."""

    room: int
    bootstrap_addr: tuple[str, ...]


def _room(params: Mapping[str, Any]) -> int | None:
    room = params.get(ROOM)
    if isinstance(room, bool) or not isinstance(room, int) or room < 0:
        return None
    return room


def remote_decode_room(params: Mapping[str, Any] | None) -> int | None:
    """Prefill: the room to send into, or None when the request is not for remote decode."""
    if not params or not params.get("do_remote_decode"):
        return None
    return _room(params)


def remote_prefill(params: Mapping[str, Any] | None) -> RemotePrefill | None:
    """Decode: the room and prefill addresses, or None when KV is not to be received.

    None also when the flag is set but the room or the address is missing or
    malformed: the request is then prefilled locally instead of waiting for
    KV that nobody can send.
    """
    if not params or not params.get("do_remote_prefill"):
        return None
    room = _room(params)
    addr = params.get(BOOTSTRAP_ADDR)
    addrs: tuple[str, ...]
    if isinstance(addr, str):
        addrs = (addr,)
    elif isinstance(addr, (list, tuple)) and all(isinstance(a, str) for a in addr):
        addrs = tuple(addr)
    else:
        return None
    if room is None or not addrs or not all(addrs):
        return None
    return RemotePrefill(room, addrs)


def decode_params(room: int, bootstrap_addr: tuple[str, ...]) -> dict[str, Any]:
    """The params prefill returns with a finished request, for the router to give decode."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        ROOM: room,
        BOOTSTRAP_ADDR: list(bootstrap_addr),
    }
