"""The protocol tables and their sans-I/O execution (kvroom.protocol), swept like h2's stream tests."""

from __future__ import annotations

import itertools

import pytest

from kvroom.fsm import Event, KVPoll
from kvroom.protocol import (
    DECODE_TABLE,
    PREFILL_TABLE,
    DecodePhase,
    DecodeVerdict,
    Fire,
    Input,
    Msg,
    PrefillPhase,
    PrefillVerdict,
    Reaction,
    Send,
    Sender,
    UnexpectedInput,
    decode_reaction,
    prefill_reaction,
)

RANKS = ("p0", "p1")


def decode_in(phase: DecodePhase) -> tuple[DecodeVerdict, KVPoll]:
    """A decode verdict put in ``phase`` by the inputs that lead there."""
    v = DecodeVerdict(7, RANKS)
    if phase is DecodePhase.TERMINAL:
        return v, KVPoll.Failed
    if phase is DecodePhase.BOOTSTRAPPING:
        return v, KVPoll.Bootstrapping
    v.sent, v.writers = True, frozenset(RANKS)
    if phase is DecodePhase.VOTED:
        v.finished = set(RANKS)
        assert v.on(KVPoll.Transferring, Input.ALL_DATA_IN).actions == [Send("p0", Msg.READY)]
    elif phase is DecodePhase.CONFIRMING:
        v.on(KVPoll.Transferring, Input.DEADLINE, reason="late")
    assert v.phase(KVPoll.Transferring) is phase
    return v, KVPoll.Transferring


@pytest.mark.parametrize(
    ("phase", "inp", "sender"),
    list(itertools.product(DecodePhase, Input, [Sender.COORDINATOR, Sender.OTHER, Sender.LOCAL])),
)
def test_every_decode_phase_input_pair_has_a_reaction_or_is_a_precise_ignore(
    phase: DecodePhase, inp: Input, sender: Sender
) -> None:
    verdict, state = decode_in(phase)
    rank = {Sender.COORDINATOR: "p0", Sender.OTHER: "p1", Sender.LOCAL: None}[sender]
    outcome = verdict.on(state, inp, rank, reason="why")  # never raises
    expected = decode_reaction(phase, inp, sender)
    if expected is None:
        assert outcome.actions == []
        assert isinstance(outcome.unexpected, UnexpectedInput)
        text = str(outcome.unexpected)
        assert "room 7" in text and "decode" in text and phase.value in text and inp.value in text
    else:
        assert outcome.unexpected is None


@pytest.mark.parametrize(
    ("phase", "inp", "coordinator"), list(itertools.product(PrefillPhase, Input, [True, False]))
)
def test_every_prefill_phase_input_pair_has_a_reaction_or_is_a_precise_ignore(
    phase: PrefillPhase, inp: Input, coordinator: bool
) -> None:
    verdict = PrefillVerdict(9, coordinator)
    state = {
        PrefillPhase.BOOTSTRAPPING: KVPoll.Bootstrapping,
        PrefillPhase.SENDING: KVPoll.Transferring,
        PrefillPhase.DELIVERED: KVPoll.Transferring,
        PrefillPhase.TERMINAL: KVPoll.Success,
    }[phase]
    verdict.delivered = phase is PrefillPhase.DELIVERED
    outcome = verdict.on(state, inp, "d0", reason="why", ranks_left=1)
    if prefill_reaction(phase, inp, coordinator) is None:
        assert outcome.actions == [] and isinstance(outcome.unexpected, UnexpectedInput)
        assert "room 9" in str(outcome.unexpected) and phase.value in str(outcome.unexpected)
    else:
        assert outcome.unexpected is None


def test_only_the_coordinator_counts_votes_and_each_decode_rank_once() -> None:
    coordinator, other = PrefillVerdict(1, True), PrefillVerdict(1, False)
    for v in (coordinator, other):
        v.on(KVPoll.Transferring, Input.DELIVERED)
    assert coordinator.on(KVPoll.Transferring, Input.READY, "d0").actions == [Fire(Event.COMPLETE, chunks=1)]
    assert coordinator.on(KVPoll.Transferring, Input.READY, "d0").actions == []  # a duplicate
    assert other.on(KVPoll.Transferring, Input.READY, "d0").unexpected is not None
    assert other.on(KVPoll.Transferring, Input.COMMIT, "d0").actions == [Fire(Event.COMPLETE, chunks=1)]
    assert other.on(KVPoll.Transferring, Input.COMMIT, "d1").actions == []  # counted once
    assert coordinator.needed(3, 2) == 3 and other.needed(3, 2) == 1
    assert not coordinator.alone and not other.alone


@pytest.mark.parametrize(
    ("decode_ranks", "prefill_ranks", "carrier", "alone"),
    [(1, 1, True, True), (2, 1, True, False), (1, 2, True, False), (1, 1, False, False)],
)
def test_only_a_coordinator_with_no_other_rank_on_either_side_commits_alone(
    decode_ranks: int, prefill_ranks: int, carrier: bool, alone: bool
) -> None:
    coordinator = PrefillVerdict(1, True)
    needed = coordinator.needed(decode_ranks, prefill_ranks, carrier)
    assert coordinator.alone is alone
    assert needed == (0 if alone else decode_ranks)  # alone: Success at its own DONE, no vote
    other = PrefillVerdict(1, False)
    assert other.needed(decode_ranks, prefill_ranks, carrier) == 1 and not other.alone


def test_the_only_sources_commit_with_its_bytes_ends_an_expecting_or_failing_room_in_success() -> None:
    solo = DecodeVerdict(4, ("p0",))
    solo.sent, solo.writers = True, frozenset({"p0"})
    assert solo.on(KVPoll.Transferring, Input.COMMITTED_DATA, "p0").actions == [
        Fire(Event.COMPLETE, chunks=1)
    ]
    # failing (an abort request is out) when the commit arrives: the coordinator committed first
    failing = DecodeVerdict(5, ("p0",))
    failing.sent, failing.writers = True, frozenset({"p0"})
    assert failing.on(KVPoll.Transferring, Input.LOCAL_ABORT, reason="bye").actions == [
        Send("p0", Msg.ABORT, "bye")
    ]
    assert failing.phase(KVPoll.Transferring) is DecodePhase.CONFIRMING
    assert failing.on(KVPoll.Transferring, Input.COMMITTED_DATA, "p0").actions == [
        Fire(Event.COMPLETE, chunks=1)
    ]
    # only from the coordinator, and never before the page list left or after a vote
    assert solo.on(KVPoll.Transferring, Input.COMMITTED_DATA, None).unexpected is not None
    early = DecodeVerdict(6, ("p0",))
    assert early.on(KVPoll.Bootstrapping, Input.COMMITTED_DATA, "p0").unexpected is not None


def test_a_committed_coordinator_cannot_be_failed_and_a_delivered_follower_waits() -> None:
    coordinator, other = PrefillVerdict(1, True), PrefillVerdict(1, False)
    for inp in (Input.DEADLINE, Input.LOCAL_ABORT, Input.ABORT, Input.PEER_LOST):
        assert coordinator.on(KVPoll.Success, inp, "d0").actions == []
    other.on(KVPoll.Transferring, Input.DELIVERED)
    assert other.on(KVPoll.Transferring, Input.DEADLINE).actions == []
    assert other.on(KVPoll.Transferring, Input.PEER_LOST, "d0", ranks_left=1).actions == []
    lost = other.on(KVPoll.Transferring, Input.PEER_LOST, "d0", ranks_left=0).actions
    assert [a.event for a in lost if isinstance(a, Fire)] == [Event.PEER_LOST]


def test_voted_decode_asks_the_coordinator_once_and_obeys_its_verdict() -> None:
    v, state = decode_in(DecodePhase.VOTED)
    assert v.on(state, Input.DEADLINE, reason="late").actions == [Send("p0", Msg.ABORT, "late")]
    assert v.on(state, Input.LOCAL_ABORT, reason="again").actions == []  # asked already
    assert v.on(state, Input.FAILED, "p1").actions == []  # only the coordinator decides now
    commit = v.on(state, Input.COMMIT, "p0").actions
    assert commit == [Fire(Event.COMPLETE, chunks=1), Send("p1", Msg.COMMIT)]


def test_failing_decode_waits_for_every_source_that_can_still_write() -> None:
    v = DecodeVerdict(3, RANKS)
    v.sent, v.writers = True, frozenset(RANKS)
    out = v.on(KVPoll.Transferring, Input.FAILED, "p0", reason="p0 failed")
    assert out.actions == [Send("p1", Msg.ABORT, "p0 failed")]  # p0 confirmed by failing; ask p1
    assert v.phase(KVPoll.Transferring) is DecodePhase.CONFIRMING
    fired = v.on(KVPoll.Transferring, Input.FAILED, "p1").actions
    assert [a.event for a in fired if isinstance(a, Fire)] == [Event.REMOTE_ABORT]


def test_tables_name_only_declared_reactions() -> None:
    assert set(DECODE_TABLE.values()) | set(PREFILL_TABLE.values()) <= set(Reaction)
    # the decision point: only the coordinator turns votes into Success
    assert {k for k, r in PREFILL_TABLE.items() if r is Reaction.COUNT_VOTE} == {
        (PrefillPhase.DELIVERED, Input.READY, True)
    }
    assert {k for k, r in DECODE_TABLE.items() if r is Reaction.SUCCEED} == {
        (DecodePhase.VOTED, Input.COMMIT, Sender.COORDINATOR),
        (DecodePhase.EXPECTING, Input.COMMITTED_DATA, Sender.COORDINATOR),  # one rank on each side
        (DecodePhase.VOTED, Input.COMMITTED_DATA, Sender.COORDINATOR),
        (DecodePhase.CONFIRMING, Input.COMMITTED_DATA, Sender.COORDINATOR),
    }
