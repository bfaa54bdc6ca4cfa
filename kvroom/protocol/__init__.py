"""The prefill/decode protocol of a room, declared as data and executed sans-I/O.

:mod:`kvroom.protocol.spec` holds the tables (messages, phases, reactions);
:mod:`kvroom.protocol.rooms` executes them per room, returning actions for the
worker to carry out.  No NIXL, no sockets, no clocks, no logging.
"""

from kvroom.protocol.rooms import EVENT_OF, DecodeVerdict, Fire, Outcome, PrefillVerdict, Send
from kvroom.protocol.spec import (
    DECODE_TABLE,
    MESSAGES,
    PREFILL_TABLE,
    DecodePhase,
    Input,
    Msg,
    PrefillPhase,
    Reaction,
    Sender,
    UnexpectedInput,
    decode_reaction,
    prefill_reaction,
)

__all__ = [
    "Msg",
    "Input",
    "Sender",
    "DecodePhase",
    "PrefillPhase",
    "Reaction",
    "DECODE_TABLE",
    "PREFILL_TABLE",
    "MESSAGES",
    "decode_reaction",
    "prefill_reaction",
    "UnexpectedInput",
    "DecodeVerdict",
    "PrefillVerdict",
    "Fire",
    "Send",
    "Outcome",
    "EVENT_OF",
]
