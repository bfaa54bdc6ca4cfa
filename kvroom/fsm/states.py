"""The room states and the two roles, apart from the machine (:mod:`kvroom.fsm.room` needs them).

:mod:`kvroom.fsm.spec` re-exports both; a room's record imports them from here
so the record and the machine that guards on it import no circle.
"""

from __future__ import annotations

import enum

__all__ = ["KVPoll", "Role"]


class KVPoll(enum.IntEnum):
    """Room states; values and order match SGLang's ``KVPoll``."""

    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4


class Role(str, enum.Enum):
    """Which side of the transfer a room belongs to."""

    SENDER = "sender"  # prefill
    RECEIVER = "receiver"  # decode
