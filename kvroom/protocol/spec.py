"""The prefill/decode protocol of one room, declared once, as data.

Theory of operation
-------------------
Every room has one **decision point**: prefill tensor-parallel rank 0 of the
room (the *coordinator*, the first bootstrap address decode lists).  Bytes
move by NIXL WRITEs from every prefill rank that holds heads a decode rank
needs; the verdict moves over the ZMQ control plane::

    decode rank j                          prefill rank 0 (coordinator)
      ROOM (page list)   ------------------>   (and to every other prefill rank)
                        <=== NIXL WRITEs ===   (from every source rank)
                        <------------------   WRITTEN: those WRITEs are DONE (from each source rank)
      every byte in place: READY  -------->    own WRITEs DONE + READY from every decode rank
                        <------------------   COMMIT: Success here, and no deadline can undo it
      Success; COMMIT   ------------------>   prefill ranks 1..n-1: Success on the relayed commit

* A source rank announces its WRITEs with WRITTEN once NIXL says they are
  DONE (its UCX backend flushes each transfer: DONE means the bytes are in
  the target's memory), on the same link as its COMMIT and FAILED.  A WRITE
  carries no NIXL notification: one would complete only with the target's
  own NIXL progress, and reach the decode worker only when it polled NIXL,
  where WRITTEN wakes it.
* A decode rank **votes** (READY) only once every byte of the room is in
  place, and after voting it reaches a verdict only from the coordinator:
  COMMIT (Success) or FAILED (Failed), or the coordinator's loss (Failed).
  Its own deadline, its scheduler's abort, or a non-coordinator's failure
  become an abort *request* to the coordinator, which decides.
* The coordinator commits only with every decode rank's vote.  Until then any
  failure there (deadline, abort, peer lost, WRITE error) is the verdict
  Failed, told to every decode rank with FAILED once none of its WRITEs can
  still land; a decode rank relays it to the other prefill ranks as ABORT.
* Other prefill ranks fail on their own only before they delivered their
  share (before the last chunk was posted): after that their data may already
  be counted in a vote, so they wait for the verdict the decode ranks relay.
* A decode rank turns Failed only once no WRITE for the room can still land
  (every source confirmed with FAILED, was lost, or finished), so its pages can
  be reused at once.
* A decode that refuses a request a room id another of its requests holds
  has no room for it: its ABORT names the refused request (its fingerprint),
  and prefill fails only its room for that request, now or as it opens.  That
  ABORT is outside every room's table here and is never answered.

One writer, one reader.  When the room has one prefill rank (it is the
coordinator and the only source) and one decode rank, the votes would only
echo what the coordinator already knows at its own DONE, so it commits there:
the announcement of the transfer whose completion made it Success carries the
commit (the room's last announcement on the link), so a room that Failed
first is never committed::

    decode                                 prefill (the only rank)
      ROOM (page list)   ------------------>
                        <=== NIXL WRITEs ===
                        <------------------   WRITTEN, the room's last marked commit:
      every byte in place and committed:      Success at its own DONE, no READY,
      Success (COMMITTED_DATA)                no COMMIT message

  A decode rank that is failing (it asked for an abort and waits for its
  source) still turns Success on that announcement: the coordinator committed
  before the abort reached it.  Any other room keeps the votes.

So, while every process keeps running, a room ends Success on every rank of
both sides or Failed on every rank of both sides.  When a process dies, the
rooms not yet committed end Failed on every surviving rank; a room the
coordinator committed ends Success on every rank that learned of the commit.

Stalls.  A worker measures its own loop's clock gap.  Time it spent stalled
is not counted as its peers' silence (it never blames a peer for its own
pause).  A prefill stalled long enough that a decode rank may have declared
it lost forgets every decode peer, as if each were lost: their rooms it has
not committed fail, and whatever they sent before giving up on it (a vote, a
page list it must not write into any more) is answered UNKNOWN instead of
being served.  A decode rank answered UNKNOWN treats that prefill as lost
(the table's PEER_LOST rows) and greets it again for its next room; a prefill
does not fail rooms with "said hello again" unless the decode restarted.

The tables below are the only place these rules are written down.  An input
with no entry is a protocol violation by the peer (or a late message): it is
ignored, and the caller logs it with room, role, phase and input.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

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
    "SEQUENCE",
    "RESULT_PHASE",
]


class Msg(str, enum.Enum):
    """Control-plane message types (the ZMQ frames of :mod:`kvroom.transport.codec`)."""

    HELLO = "hello"  # decode -> prefill: agent metadata, layout, regions
    WELCOME = "welcome"  # prefill -> decode: agent metadata, layout
    REJECT = "reject"  # prefill -> decode: the handshake is refused
    ROOM = "room"  # decode -> prefill: where to write a room's pages
    WRITTEN = "written"  # prefill -> decode: these WRITEs are DONE (their bytes are in place)
    READY = "ready"  # decode -> coordinator: every byte of the room is in place (the vote)
    COMMIT = "commit"  # coordinator -> decode (the verdict Success); decode -> other prefill ranks (relay)
    ABORT = "abort"  # decode -> prefill: fail the room (a request, when the coordinator receives it)
    FAILED = "failed"  # prefill -> decode: the room failed here and none of my WRITEs can still land
    PING = "ping"  # decode -> prefill heartbeat
    PONG = "pong"  # prefill -> decode heartbeat answer
    UNKNOWN = "unknown"  # prefill -> decode: I do not know you (I declared you lost); re-handshake


MESSAGES: dict[Msg, tuple[str, str, str]] = {
    Msg.HELLO: ("decode", "prefill", "handshake: agent metadata, KV layout, registered regions"),
    Msg.WELCOME: ("prefill", "decode", "handshake accepted: agent metadata, KV layout"),
    Msg.REJECT: ("prefill", "decode", "handshake refused, with the field that differs"),
    Msg.ROOM: ("decode", "prefill", "a room's page list, prefix, aux slot and staging offsets"),
    Msg.WRITTEN: ("prefill", "decode", "these WRITEs are DONE: their pages, by room and sequence number"),
    Msg.READY: ("decode", "prefill", "vote, to the coordinator: every byte of the room is in place"),
    Msg.COMMIT: ("both", "both", "the coordinator's verdict Success; decode relays it to other ranks"),
    Msg.ABORT: ("decode", "prefill", "fail the room (to the coordinator after a vote: a request)"),
    Msg.FAILED: ("prefill", "decode", "the room failed here; none of its WRITEs can still land"),
    Msg.PING: ("decode", "prefill", "heartbeat"),
    Msg.PONG: ("prefill", "decode", "heartbeat answer"),
    Msg.UNKNOWN: ("prefill", "decode", "this prefill declared you lost: fail what we shared, greet again"),
}
"""Every message: (sent by, received by, meaning).  Drawn by :mod:`kvroom.observe.diagrams`."""


class Input(str, enum.Enum):
    """What reaches one room's protocol: messages, local facts and timers."""

    # messages (see Msg)
    READY = "READY"
    COMMIT = "COMMIT"
    ABORT = "ABORT"
    FAILED = "FAILED"
    # local facts
    ALL_DATA_IN = "all bytes in place"  # decode: every source finished, every page landed
    COMMITTED_DATA = "all bytes in place, committed"  # decode: ALL_DATA_IN, the only source's commit with it
    DELIVERED = "last chunk posted"  # prefill: this rank's share is on its way
    WRITE_ERROR = "WRITE error"  # prefill: NIXL raised for one of the room's WRITEs
    PEER_LOST = "peer lost"  # heartbeat silence, NIXL disconnect, UNKNOWN, or a reject
    DEADLINE = "deadline"  # the room's state deadline passed
    LOCAL_ABORT = "local abort"  # this side's scheduler aborted the room


class Sender(str, enum.Enum):
    """Who an input came from, as far as the room's verdict is concerned."""

    COORDINATOR = "coordinator"  # prefill rank 0 of the room
    OTHER = "other rank"  # any other rank of the other side
    LOCAL = "local"  # this process (timers, scheduler, own transport)


class DecodePhase(str, enum.Enum):
    """Where one decode rank's room stands in the protocol."""

    BOOTSTRAPPING = "Bootstrapping"  # page list not sent: no WRITE can land
    EXPECTING = "Expecting"  # page list sent, bytes still arriving
    VOTED = "Voted"  # READY sent: only the coordinator decides now
    CONFIRMING = "Confirming"  # failing: waiting until no source can still write
    TERMINAL = "Terminal"  # Success, Failed, or no such room


class PrefillPhase(str, enum.Enum):
    """Where one prefill rank's room stands in the protocol."""

    BOOTSTRAPPING = "Bootstrapping"  # waiting for every decode rank's page list
    SENDING = "Sending"  # chunks being posted
    DELIVERED = "Delivered"  # last chunk posted: completions, votes or the commit outstanding
    TERMINAL = "Terminal"


class Reaction(str, enum.Enum):
    """What a room does with an input.  The worker executes it; it decides nothing itself."""

    IGNORE = "ignore"  # expected and harmless (late, duplicate): recorded, nothing changes
    FAIL = "fail"  # Failed now (prefill: FAILED to decode once WRITEs drained; decode: ABORT prefill)
    FAIL_AFTER_CONFIRM = "fail once nothing can land"  # decode: ABORT every rank, wait for the sources
    FAIL_IF_ALONE = "fail if no decode rank is left"  # prefill rank > 0 after delivery: wait for a relay
    CONFIRM = "count a confirmation"  # decode, failing: this source can no longer write
    ASK_COORDINATOR = "ask the coordinator to abort"  # decode after its vote
    VOTE = "send READY"  # decode: every byte is in place
    COUNT_VOTE = "count the vote"  # coordinator: Success (and COMMIT) once every decode rank voted
    COUNT_COMMIT = "count the commit"  # prefill rank > 0: Success once its own WRITEs are DONE
    SUCCEED = "Success, relay COMMIT"  # decode: the coordinator committed
    WAIT_FOR_VERDICT = "wait for the verdict"  # prefill rank > 0 after delivery: rank 0 decides


class UnexpectedInput(NamedTuple):
    """An input the table has no entry for: a peer's protocol violation or a late message."""

    room: int
    role: str
    phase: str
    input: str
    sender: str

    def __str__(self) -> str:
        return (
            f"room {self.room} ({self.role}): {self.input} from {self.sender} "
            f"is not expected in phase {self.phase}; ignored"
        )


_B, _E, _V, _C = (DecodePhase.BOOTSTRAPPING, DecodePhase.EXPECTING, DecodePhase.VOTED, DecodePhase.CONFIRMING)
_CO, _OT, _LO = Sender.COORDINATOR, Sender.OTHER, Sender.LOCAL
R = Reaction

DECODE_TABLE: dict[tuple[DecodePhase, Input, Sender], Reaction] = {
    # before the page list left, nothing can land: fail at once, and tell every rank
    (_B, Input.FAILED, _CO): R.FAIL,
    (_B, Input.FAILED, _OT): R.FAIL,
    (_B, Input.PEER_LOST, _CO): R.FAIL,
    (_B, Input.PEER_LOST, _OT): R.FAIL,
    (_B, Input.DEADLINE, _LO): R.FAIL,
    (_B, Input.LOCAL_ABORT, _LO): R.FAIL,
    # bytes arriving: any failure is final, but waits until no source can still write
    (_E, Input.FAILED, _CO): R.FAIL_AFTER_CONFIRM,
    (_E, Input.FAILED, _OT): R.FAIL_AFTER_CONFIRM,
    (_E, Input.PEER_LOST, _CO): R.FAIL_AFTER_CONFIRM,
    (_E, Input.PEER_LOST, _OT): R.FAIL_AFTER_CONFIRM,
    (_E, Input.DEADLINE, _LO): R.FAIL_AFTER_CONFIRM,
    (_E, Input.LOCAL_ABORT, _LO): R.FAIL_AFTER_CONFIRM,
    (_E, Input.ALL_DATA_IN, _LO): R.VOTE,
    (_E, Input.COMMITTED_DATA, _CO): R.SUCCEED,  # one writer, one reader: its last WRITTEN commits
    # voted: every source finished, so nothing can land; only the coordinator decides
    (_V, Input.COMMIT, _CO): R.SUCCEED,
    (_V, Input.COMMITTED_DATA, _CO): R.SUCCEED,  # voted on bytes whose commit came after them
    (_V, Input.FAILED, _CO): R.FAIL,
    (_V, Input.PEER_LOST, _CO): R.FAIL,
    (_V, Input.FAILED, _OT): R.ASK_COORDINATOR,
    (_V, Input.PEER_LOST, _OT): R.ASK_COORDINATOR,
    (_V, Input.DEADLINE, _LO): R.ASK_COORDINATOR,
    (_V, Input.LOCAL_ABORT, _LO): R.ASK_COORDINATOR,
    # failing: count the sources that can no longer write
    (_C, Input.FAILED, _CO): R.CONFIRM,
    (_C, Input.FAILED, _OT): R.CONFIRM,
    (_C, Input.PEER_LOST, _CO): R.CONFIRM,
    (_C, Input.PEER_LOST, _OT): R.CONFIRM,
    (_C, Input.ALL_DATA_IN, _LO): R.IGNORE,  # too late: the room is failing
    (_C, Input.COMMITTED_DATA, _CO): R.SUCCEED,  # the commit overtook our abort request
    (_C, Input.DEADLINE, _LO): R.IGNORE,  # the confirmation has its own bound
    (_C, Input.LOCAL_ABORT, _LO): R.IGNORE,
}
"""Decode rank: (phase, input, sender) -> reaction.  Missing: :class:`UnexpectedInput`."""

_PB, _PS, _PD = PrefillPhase.BOOTSTRAPPING, PrefillPhase.SENDING, PrefillPhase.DELIVERED
# the coordinator (prefill rank 0 of the room) and the other prefill ranks differ only in
# what they may decide; their rows are keyed by ``coordinator`` (True/False)

PREFILL_TABLE: dict[tuple[PrefillPhase, Input, bool], Reaction] = {
    **{
        (phase, inp, coordinator): R.FAIL
        for phase in (_PB, _PS)
        for inp in (Input.ABORT, Input.DEADLINE, Input.LOCAL_ABORT, Input.PEER_LOST, Input.WRITE_ERROR)
        for coordinator in (True, False)
    },
    (_PS, Input.DELIVERED, True): R.IGNORE,  # phase change only
    (_PS, Input.DELIVERED, False): R.IGNORE,
    # the coordinator decides
    (_PD, Input.READY, True): R.COUNT_VOTE,
    (_PD, Input.ABORT, True): R.FAIL,
    (_PD, Input.DEADLINE, True): R.FAIL,
    (_PD, Input.LOCAL_ABORT, True): R.FAIL,
    (_PD, Input.PEER_LOST, True): R.FAIL,
    (_PD, Input.WRITE_ERROR, True): R.FAIL,
    # other ranks follow: decode sends them ABORT only when the room can no longer commit
    (_PD, Input.COMMIT, False): R.COUNT_COMMIT,
    (_PD, Input.ABORT, False): R.FAIL,
    (_PD, Input.WRITE_ERROR, False): R.FAIL,  # the bytes did not land: no vote can count them
    (_PD, Input.PEER_LOST, False): R.FAIL_IF_ALONE,
    (_PD, Input.DEADLINE, False): R.WAIT_FOR_VERDICT,
    (_PD, Input.LOCAL_ABORT, False): R.WAIT_FOR_VERDICT,
}
"""Prefill rank: (phase, input, is coordinator) -> reaction.  Missing: :class:`UnexpectedInput`."""


def decode_reaction(phase: DecodePhase, inp: Input, sender: Sender) -> Reaction | None:
    """The decode table's entry, or None (unexpected: ignore and log)."""
    if phase is DecodePhase.TERMINAL:
        return Reaction.IGNORE  # terminal rooms absorb everything
    return DECODE_TABLE.get((phase, inp, sender))


def prefill_reaction(phase: PrefillPhase, inp: Input, coordinator: bool) -> Reaction | None:
    """The prefill table's entry, or None (unexpected: ignore and log)."""
    if phase is PrefillPhase.TERMINAL:
        return Reaction.IGNORE
    return PREFILL_TABLE.get((phase, inp, coordinator))


SEQUENCE: tuple[tuple[str, str, Msg, str], ...] = (
    ("decode", "prefill0", Msg.HELLO, "once per process pair"),
    ("prefill0", "decode", Msg.WELCOME, ""),
    ("decode", "prefill0", Msg.ROOM, "to every prefill rank of the room"),
    ("decode", "prefillk", Msg.ROOM, ""),
    ("prefill0", "decode", Msg.COMMIT, "after READY from every decode rank and its own WRITEs DONE"),
    ("decode", "prefillk", Msg.COMMIT, "relayed: Success there once its own WRITEs are DONE"),
)
"""The control messages of one successful room, in order (drawn as a sequence diagram;
the WRITEs and READY are inserted where they happen)."""

RESULT_PHASE: dict[Reaction, str] = {
    Reaction.FAIL: "Failed",
    Reaction.FAIL_AFTER_CONFIRM: "Confirming",
    Reaction.FAIL_IF_ALONE: "Failed",
    Reaction.CONFIRM: "Failed",
    Reaction.ASK_COORDINATOR: "Voted",
    Reaction.VOTE: "Voted",
    Reaction.COUNT_VOTE: "Success",
    Reaction.COUNT_COMMIT: "Success",
    Reaction.SUCCEED: "Success",
}
"""Where a reaction leads (for diagrams; counting reactions reach it with the last count).
Reactions not listed leave the phase as it is."""
