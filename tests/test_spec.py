"""Exhaustive sweep of every (state, event) pair of both roles, h2-style.

Each case runs through kvroom's compiled engine and through the ``transitions``
library itself (the reference engine) on the same declaration; they must agree.
Policy checks (who raises, who ignores, monotone progress) are asserted directly.
"""

from __future__ import annotations

import itertools

import pytest
from transitions import MachineError

from kvroom.errors import RoomStateError
from kvroom.fsm import MACHINES, RULES, TERMINAL, Event, KVPoll, Origin, RecordingObserver, Role, RoomTable
from kvroom.fsm.spec import FAILING_EVENTS, ORIGIN

CASES = list(itertools.product(Role, KVPoll, Event, [False, True]))


class RefModel:
    """A model for the reference engine: transitions sets ``state`` to a name."""

    def __init__(self, state: KVPoll, guards: bool) -> None:
        self.state = state.name
        self.infos_got = self.infos_needed = 1
        self.chunks_needed = 1
        self.chunks_done = 1 if guards else 0
        self.aux_done = guards
        if not guards:
            self.infos_got = 0
        self.owner = self
        self.cleanups = 0

    def cleanup(self, room: object) -> None:
        self.cleanups += 1


def reference(role: Role, state: KVPoll, event: Event, guards: bool) -> tuple[str, KVPoll, int]:
    """(outcome, final state, cleanups) according to the transitions library."""
    model = RefModel(state, guards)
    machine = MACHINES[role]
    if event.value not in machine.events:  # the role declares no rule for it at all
        return "no-rule", state, 0
    try:
        took = machine.events[event.value].trigger(model, model)
    except MachineError:
        return "no-rule", state, 0
    return ("moved" if took else "guarded"), KVPoll[model.state], model.cleanups


def put_in_state(table: RoomTable, state: KVPoll, guards: bool) -> object:
    room = table.create(1, 0.0)
    table.transfer_infos.put(room, "info")
    room.state = state
    room.infos_needed = 1
    room.infos_got = 1 if guards else 0
    room.chunks_needed = 1
    room.chunks_done = 1 if guards else 0
    room.aux_done = guards
    return room


@pytest.mark.parametrize(("role", "state", "event", "guards"), CASES)
def test_every_state_event_pair(role: Role, state: KVPoll, event: Event, guards: bool) -> None:
    obs = RecordingObserver()
    table = RoomTable(role, observer=obs)
    room = put_in_state(table, state, guards)
    expected, ref_state, ref_cleanups = reference(role, state, event, guards)

    if expected == "no-rule" and ORIGIN[event] is Origin.API and state is not KVPoll.Failed:
        with pytest.raises(RoomStateError) as info:
            table.fire(room, event, 1.0)
        msg = str(info.value)
        assert f"room 1 ({role.value})" in msg and state.name in msg and repr(event.value) in msg
        assert room.state is state and room.live and not obs.transitions
        return

    took = table.fire(room, event, 1.0)
    assert room.state is ref_state
    assert took is (expected == "moved")
    if expected == "no-rule":
        assert [r.event for r in obs.ignored] == [event]
        assert not obs.transitions and room.live
    cleanups = len(obs.cleanups)
    assert cleanups == ref_cleanups
    if cleanups:
        assert table.footprint(1) == frozenset()
        assert obs.cleanups[0].stores == ("request_status", "transfer_infos")


@pytest.mark.parametrize("role", list(Role))
def test_failing_events_fail_every_non_terminal_state(role: Role) -> None:
    for state, event in itertools.product(KVPoll, FAILING_EVENTS):
        if state in TERMINAL:
            continue
        table = RoomTable(role)
        room = put_in_state(table, state, False)
        assert table.fire(room, event, 1.0, reason="x")
        assert room.state is KVPoll.Failed and table.footprint(1) == frozenset()


@pytest.mark.parametrize("role", list(Role))
def test_progress_is_monotone_and_terminal_states_absorb(role: Role) -> None:
    order = [KVPoll.Bootstrapping, KVPoll.WaitingForInput, KVPoll.Transferring, KVPoll.Success]
    for rule in RULES[role]:
        assert rule.source not in TERMINAL or rule.dest is None, rule
        if rule.dest is not None and rule.dest is not KVPoll.Failed:
            assert order.index(rule.dest) > order.index(rule.source), rule


@pytest.mark.parametrize("role", list(Role))
def test_failed_absorbs_api_events_and_success_rejects_them(role: Role) -> None:
    table = RoomTable(role)
    room = put_in_state(table, KVPoll.Failed, True)
    assert table.fire(room, Event.SEND, 1.0) is False
    table2 = RoomTable(role)
    room2 = put_in_state(table2, KVPoll.Success, True)
    with pytest.raises(RoomStateError, match="not allowed in state Success"):
        table2.fire(room2, Event.SEND, 1.0)
    assert table2.fire(room2, Event.PEER_LOST, 1.0) is False
    assert room2.state is KVPoll.Success


def test_kvpoll_matches_sglang_numbering() -> None:
    assert [(s.name, int(s)) for s in KVPoll] == [
        ("Failed", 0),
        ("Bootstrapping", 1),
        ("WaitingForInput", 2),
        ("Transferring", 3),
        ("Success", 4),
    ]
    import kvroom

    assert kvroom.KVPoll is KVPoll
    assert min(KVPoll.Success, KVPoll.Failed) is KVPoll.Failed
