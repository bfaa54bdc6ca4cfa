"""Per-room protocol state on each side: the tables of :mod:`kvroom.protocol.spec`, executed.

Sans-I/O: an input (a message, a local fact or a timer) goes in, a list of
actions comes out: events for the room machine (:class:`Fire`) and messages to
send (:class:`Send`).  The prefill and decode workers execute the actions on
the transport; :mod:`tests.test_protocol_model` executes them on simulated
links.  Neither decides anything the tables do not say.
"""

from __future__ import annotations

from typing import NamedTuple

from kvroom.fsm.spec import Event, KVPoll
from kvroom.protocol.spec import (
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

__all__ = ["Fire", "Send", "Outcome", "DecodeVerdict", "PrefillVerdict", "EVENT_OF"]

EVENT_OF: dict[Input, Event] = {
    Input.FAILED: Event.REMOTE_ABORT,
    Input.ABORT: Event.REMOTE_ABORT,
    Input.PEER_LOST: Event.PEER_LOST,
    Input.DEADLINE: Event.TIMEOUT,
    Input.LOCAL_ABORT: Event.ABORT,
    Input.WRITE_ERROR: Event.TRANSPORT_ERROR,
}
"""The room-machine event a failing input fires."""


class Fire(NamedTuple):
    """Fire ``event`` on the room (``chunks`` advances its progress counter)."""

    event: Event
    reason: str | None = None
    error: BaseException | None = None
    chunks: int = 0


class Send(NamedTuple):
    """Send ``msg`` about the room to the rank ``to``."""

    to: str
    msg: Msg
    reason: str = ""


class Outcome(NamedTuple):
    """What one input produced: actions in order, and the violation when there was no entry."""

    actions: list[Fire | Send]
    unexpected: UnexpectedInput | None = None


class DecodeVerdict:
    """One decode rank's protocol state for one room.

    ``ranks``: the room's prefill ranks in rank order (``ranks[0]`` is the
    coordinator).  ``writers``: the ranks that WRITE into this rank (set
    when the page list is sent); ``finished``: those whose share ended.
    """

    __slots__ = ("asked", "failure", "finished", "ranks", "room", "sent", "voted", "waiting", "writers")

    def __init__(self, room: int, ranks: tuple[str, ...]) -> None:
        if not ranks:
            raise ValueError("a room needs at least one prefill rank")
        self.room = room
        self.ranks = ranks
        self.writers: frozenset[str] = frozenset()
        self.finished: set[str] = set()
        self.sent = False  # the page list left: WRITEs may land from now on
        self.voted = False
        self.asked = False  # an abort request went to the coordinator
        self.waiting: frozenset[str] | None = None  # failing: sources that may still write
        self.failure: Fire | None = None  # failing: what fires once ``waiting`` empties

    @property
    def coordinator(self) -> str:
        """Prefill rank 0 of the room: the one that decides its verdict."""
        return self.ranks[0]

    def phase(self, state: KVPoll) -> DecodePhase:
        """The protocol phase, given the room machine's state."""
        if state in (KVPoll.Success, KVPoll.Failed):
            return DecodePhase.TERMINAL
        if self.waiting is not None:
            return DecodePhase.CONFIRMING
        if self.voted:
            return DecodePhase.VOTED
        return DecodePhase.EXPECTING if self.sent else DecodePhase.BOOTSTRAPPING

    def sender(self, rank: str | None) -> Sender:
        """How the table sees the rank an input came from (None: this process)."""
        if rank is None:
            return Sender.LOCAL
        return Sender.COORDINATOR if rank == self.coordinator else Sender.OTHER

    def on(
        self,
        state: KVPoll,
        inp: Input,
        rank: str | None = None,
        *,
        reason: str = "",
        error: BaseException | None = None,
    ) -> Outcome:
        """React to ``inp`` from ``rank`` (None: local) while the room is in ``state``."""
        phase = self.phase(state)
        sender = self.sender(rank)
        reaction = decode_reaction(phase, inp, sender)
        if reaction is None:
            return Outcome([], UnexpectedInput(self.room, "decode", phase.value, inp.value, sender.value))
        failing = Fire(EVENT_OF[inp], reason, error) if inp in EVENT_OF else None
        others = [r for r in self.ranks if r != rank]
        if reaction is Reaction.FAIL:
            assert failing is not None
            return Outcome([failing, *(Send(r, Msg.ABORT, reason) for r in others)])
        if reaction is Reaction.FAIL_AFTER_CONFIRM:
            assert failing is not None
            waiting = self.writers - self.finished - {rank}
            tell = [Send(r, Msg.ABORT, reason) for r in others]
            if not waiting:
                return Outcome([failing, *tell])
            self.waiting, self.failure = frozenset(waiting), failing
            return Outcome(list(tell))
        if reaction is Reaction.CONFIRM:
            assert self.waiting is not None and self.failure is not None
            self.waiting = self.waiting - {rank}
            return Outcome([self.failure] if not self.waiting else [])
        if reaction is Reaction.ASK_COORDINATOR:
            if self.asked:
                return Outcome([])
            self.asked = True
            return Outcome([Send(self.coordinator, Msg.ABORT, reason)])
        if reaction is Reaction.VOTE:
            self.voted = True
            return Outcome([Send(self.coordinator, Msg.READY)])
        if reaction is Reaction.SUCCEED:
            return Outcome([Fire(Event.COMPLETE, chunks=1), *(Send(r, Msg.COMMIT) for r in self.ranks[1:])])
        return Outcome([])  # IGNORE

    def overdue(self) -> Fire | None:
        """Failing for too long without every confirmation: the failure to fire anyway."""
        return self.failure if self.waiting else None


class PrefillVerdict:
    """One prefill rank's protocol state for one room.

    ``coordinator``: this rank is prefill rank 0 of the room and decides its
    verdict.  Votes are counted once per decode rank; the relayed commit once.
    ``alone``: the room has no other rank on either side, so the coordinator
    commits at its own DONE, in its last WRITTEN (set by :meth:`needed`).
    """

    __slots__ = ("alone", "committed", "coordinator", "delivered", "room", "votes")

    def __init__(self, room: int, coordinator: bool) -> None:
        self.room = room
        self.coordinator = coordinator
        self.delivered = False
        self.votes: set[str] = set()
        self.committed = False
        self.alone = False

    def needed(self, decode_ranks: int, prefill_ranks: int, carrier: bool = True) -> int:
        """Confirmations Success waits for besides this rank's own WRITEs, as the last chunk
        is posted: every decode rank's vote (coordinator), the relayed commit (other ranks),
        or none when one prefill rank writes to one decode rank and the last chunk has a
        WRITE whose announcement can carry the commit (``carrier``): it then commits alone."""
        self.alone = self.coordinator and prefill_ranks == 1 and decode_ranks == 1 and carrier
        if self.alone:
            return 0
        return decode_ranks if self.coordinator else 1

    def phase(self, state: KVPoll) -> PrefillPhase:
        """The protocol phase, given the room machine's state."""
        if state in (KVPoll.Success, KVPoll.Failed):
            return PrefillPhase.TERMINAL
        if state is KVPoll.Bootstrapping:
            return PrefillPhase.BOOTSTRAPPING
        return PrefillPhase.DELIVERED if self.delivered else PrefillPhase.SENDING

    def on(
        self,
        state: KVPoll,
        inp: Input,
        rank: str | None = None,
        *,
        reason: str = "",
        error: BaseException | None = None,
        ranks_left: int = 1,
    ) -> Outcome:
        """React to ``inp`` from decode rank ``rank`` (None: local).

        ``ranks_left``: decode ranks of the room still connected (for a lost one).
        """
        phase = self.phase(state)
        reaction = prefill_reaction(phase, inp, self.coordinator)
        if reaction is None:
            sender = "local" if rank is None else f"decode {rank}"
            role = "prefill coordinator" if self.coordinator else "prefill"
            return Outcome([], UnexpectedInput(self.room, role, phase.value, inp.value, sender))
        if inp is Input.DELIVERED:
            self.delivered = True
        failing = Fire(EVENT_OF[inp], reason, error) if inp in EVENT_OF else None
        if reaction is Reaction.FAIL or (reaction is Reaction.FAIL_IF_ALONE and ranks_left <= 0):
            assert failing is not None
            return Outcome([failing])
        if reaction is Reaction.COUNT_VOTE:
            if rank is None or rank in self.votes:
                return Outcome([])
            self.votes.add(rank)
            return Outcome([Fire(Event.COMPLETE, chunks=1)])
        if reaction is Reaction.COUNT_COMMIT:
            if self.committed:
                return Outcome([])
            self.committed = True
            return Outcome([Fire(Event.COMPLETE, chunks=1)])
        return Outcome([])  # IGNORE, WAIT_FOR_VERDICT, FAIL_IF_ALONE with ranks left
