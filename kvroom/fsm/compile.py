"""The rule compiler: a parsed ``transitions`` machine as lookup tables.

:func:`compile_machine` reads each role's machine of :mod:`kvroom.fsm.spec`
(``machine.events[e].transitions`` and ``machine.states[s].on_enter``) into
``rules[event][state]``: the tuple of ``(guard, dest, after hooks)`` rows to try
in order, or None where no transition is declared (an illegal input), and the
``on_enter`` hooks per state.  The room table executes these (one list index
per event); ``transitions`` itself never runs on the hot path.  Hooks must be
callables: a string callback would resolve on a model by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from transitions import Machine

from kvroom.fsm.room import Room
from kvroom.fsm.spec import MACHINES, Event, KVPoll, Role

__all__ = ["COMPILED", "Compiled", "CompiledRule", "EnterHooks", "compile_machine"]


class CompiledRule(NamedTuple):
    """One executable row: guard (or None), destination (None: internal), after hooks."""

    guard: Callable[[Room], bool] | None
    dest: KVPoll | None
    after: tuple[Callable[[Room], None], ...]


Compiled = dict[Event, list[tuple[CompiledRule, ...] | None]]
EnterHooks = list[tuple[Callable[[Room], None], ...]]


def _callables(name: str, funcs: Iterable[object]) -> tuple[Callable[..., Any], ...]:
    """Hooks must be callables: string callbacks would resolve on a model by name."""
    out: list[Callable[..., Any]] = []
    for func in funcs:
        if not callable(func):
            raise TypeError(f"{name}: hook {func!r} is not a callable; pass functions, not names")
        out.append(func)
    return tuple(out)


def compile_machine(machine: Machine) -> tuple[Compiled, EnterHooks]:
    """Turn a parsed ``transitions`` Machine into lookup tables.

    Returns ``rules[event][state]`` (None where no transition is declared) and
    ``enter_hooks[state]``.
    """
    rules: Compiled = {event: [None] * len(KVPoll) for event in Event}
    for name, ev in machine.events.items():
        event = Event(name)
        for src_name, trans_list in ev.transitions.items():
            compiled = []
            for t in trans_list:
                if len(t.conditions) > 1 or any(not c.target for c in t.conditions):
                    raise ValueError(f"{name}: only one positive guard per rule is supported")
                guards = _callables(name, (c.func for c in t.conditions))
                dest = KVPoll[t.dest] if t.dest is not None else None
                compiled.append(CompiledRule(guards[0] if guards else None, dest, _callables(name, t.after)))
            rules[event][KVPoll[src_name]] = tuple(compiled)
    enter: EnterHooks = [()] * len(KVPoll)
    for state in KVPoll:
        enter[state] = _callables(state.name, machine.states[state.name].on_enter)
    return rules, enter


#: every role's machine, compiled once at import
COMPILED = {role: compile_machine(MACHINES[role]) for role in Role}
