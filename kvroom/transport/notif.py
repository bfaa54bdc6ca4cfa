"""The notification of each WRITE of a room, and its parser.

Prefill sends them to decode in a WRITTEN control message once the NIXL
transfer that carried the WRITEs is DONE (not as NIXL notifications: with one,
NIXL completes a transfer only after the target's own progress).

``kvr2:room:seq:start:npages:last``: the WRITE numbered ``seq`` (per room
and decode rank, from 0) of one prefill rank filled pages ``start..start+npages``
of the decode rank's page list (0 pages for state and aux rows); ``last``
(bit 1) marks the final WRITE of that prefill rank's share, so its ``seq + 1`` is how
many WRITEs the share took, whatever order the notifications arrive in.  Bit 2
marks the coordinator's commit of a room with one rank on each side, on the
room's last announcement: the one sent once its last WRITE was DONE
(:mod:`kvroom.protocol.spec`).

One NIXL transfer may carry several WRITEs (prefill's outbox joins a worker
turn's WRITEs to one decode agent): its WRITTEN lists theirs joined by ``;``,
and :func:`parse_notifs` returns each.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

__all__ = ["Notif", "mark_commits", "notif_message", "parse_notif", "parse_notifs"]


def notif_message(room: int, seq: int, start: int, npages: int, last: bool, commit: bool = False) -> bytes:
    """The notification of WRITE ``seq`` of a share: pages ``start..start+npages`` arrived;
    ``last`` ends the share; ``commit`` commits the room."""
    return f"kvr2:{room}:{seq}:{start}:{npages}:{int(last) | 2 * int(commit)}".encode()


class Notif(NamedTuple):
    """A parsed chunk notification."""

    room: int
    seq: int
    start: int
    npages: int
    last: bool
    commit: bool = False


def parse_notif(msg: bytes) -> Notif | None:
    """The notification, or None for anything malformed."""
    try:
        tag, *numbers, last = msg.decode("ascii").split(":")
        room, seq, start, npages = (int(x) for x in numbers)
    except (UnicodeDecodeError, ValueError):
        return None
    if tag != "kvr2" or min(room, seq, start, npages) < 0 or last not in ("0", "1", "2", "3"):
        return None
    flags = int(last)
    return Notif(room, seq, start, npages, bool(flags & 1), bool(flags & 2))


def parse_notifs(msg: bytes) -> list[Notif]:
    """Every notification in ``msg`` (one, or several joined by ``;``); [] if any is malformed."""
    out: list[Notif] = []
    for part in msg.split(b";"):
        one = parse_notif(part)
        if one is None:
            return []
        out.append(one)
    return out


def mark_commits(msg: bytes, at: Iterable[int]) -> bytes:
    """``msg`` (notifications joined by ``;``) with the notifications at positions ``at`` marked commit."""
    parts = msg.split(b";")
    for i in at:
        n = parse_notif(parts[i])
        if n is not None:
            parts[i] = notif_message(n.room, n.seq, n.start, n.npages, n.last, commit=True)
    return b";".join(parts)
