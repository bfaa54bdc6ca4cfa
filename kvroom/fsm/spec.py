"""The room state machines of kvroom, declared once, as data.

Theory of operation
-------------------
Every KV-cache transfer is a *room*: one request moving its pages from a
prefill process (the **sender** role) to a decode process (the **receiver**
role).  Each side keeps one room per request and walks it through the states
of :class:`KVPoll`, numbered exactly like SGLang's ``KVPoll`` so schedulers that
compare or MIN-reduce poll values across ranks keep working::

    Bootstrapping -> WaitingForInput -> Transferring -> Success
          \\________________\\_______________\\__________-> Failed

Inputs are the members of :class:`Event`.  Each event has an :class:`Origin`:

* ``API`` events come from the local scheduler (``send()``, ``clear()``).  An
  API event with no entry for the current state is a programming error and
  raises :class:`~kvroom.errors.RoomStateError` naming room, role, state and
  event (like h11's ``LocalProtocolError``).
* ``PEER`` events come from the transport: the other side, a NIXL completion, a
  heartbeat monitor, a clock.  They race with everything else, so a PEER event
  with no entry (a late notification, a duplicate, a message for a room that is
  already terminal or cleared) changes nothing and is reported as *ignored*.

``Failed`` absorbs every event, API ones included: a room can fail at any
moment on a transport thread, and a scheduler that calls ``send()`` a moment
later must not crash for it.  ``Success`` absorbs PEER events and rejects API
events other than ``clear``.  Progress is monotone: no rule ever moves a room
back to an earlier state.

Entering ``Failed`` runs the one cleanup (the state's ``on_enter`` hook), which
removes the room from every registered store; ``clear`` after ``Success`` runs
the same cleanup as its ``after`` hook.

The tables below are the only place the machines are written down.  They are
parsed by the ``transitions`` library into one module-level ``Machine`` per
role (``model=None``), which is the reference engine and the source of the
diagrams.  The room table executes the rule table compiled from that parsed
machine (see :mod:`kvroom.fsm.table`): firing ``transitions`` events directly
costs ~8 us per event, ~50x a dict lookup, and schedulers call this on their
hottest thread.  A test sweeps every (state, event, guard) case through both
engines and requires them to agree.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transitions import Machine, State

from kvroom.fsm.states import KVPoll, Role

if TYPE_CHECKING:
    from kvroom.fsm.room import Room

__all__ = [
    "KVPoll",
    "Role",
    "Event",
    "Origin",
    "Rule",
    "TERMINAL",
    "FAILING_EVENTS",
    "ORIGIN",
    "RULES",
    "Hooks",
    "build_machine",
]


TERMINAL = frozenset({KVPoll.Failed, KVPoll.Success})
NON_TERMINAL = (KVPoll.Bootstrapping, KVPoll.WaitingForInput, KVPoll.Transferring)


class Event(str, enum.Enum):
    """Inputs to a room state machine."""

    # sender (prefill)
    DST_INFO = "dst_info"  # one destination's transfer info arrived
    SEND = "send"  # the scheduler handed over a chunk
    # receiver (decode)
    METADATA_SENT = "metadata_sent"  # our page list reached the prefill side
    CHUNK_ARRIVED = "chunk_arrived"  # a chunk's completion notification arrived
    # both
    COMPLETE = "complete"  # every chunk (and aux) confirmed
    CLEAR = "clear"  # the scheduler is done with a successful room
    ABORT = "abort"  # the local scheduler aborted the room
    REMOTE_ABORT = "remote_abort"  # the peer aborted or failed the room
    TRANSPORT_ERROR = "transport_error"  # NIXL raised for this room's transfer
    PEER_LOST = "peer_lost"  # the peer process is gone
    TIMEOUT = "timeout"  # a state deadline passed


class Origin(enum.Enum):
    """Where an event comes from, which decides how a missing rule is treated."""

    API = "api"  # local scheduler: a missing rule is misuse and raises
    PEER = "peer"  # transport/peer/clock: a missing rule is ignored and recorded


ORIGIN: dict[Event, Origin] = {
    Event.DST_INFO: Origin.PEER,
    Event.SEND: Origin.API,
    Event.METADATA_SENT: Origin.PEER,
    Event.CHUNK_ARRIVED: Origin.PEER,
    Event.COMPLETE: Origin.PEER,
    Event.CLEAR: Origin.API,
    # abort is the scheduler's, but aborting a finished room is harmless
    Event.ABORT: Origin.PEER,
    Event.REMOTE_ABORT: Origin.PEER,
    Event.TRANSPORT_ERROR: Origin.PEER,
    Event.PEER_LOST: Origin.PEER,
    Event.TIMEOUT: Origin.PEER,
}

FAILING_EVENTS = (
    Event.ABORT,
    Event.REMOTE_ABORT,
    Event.TRANSPORT_ERROR,
    Event.PEER_LOST,
    Event.TIMEOUT,
)


# -- guards -----------------------------------------------------------------
# Guards read counters kept on the room itself, so they need no store lookups.


def all_dst_infos(room: Room) -> bool:
    """Sender: every destination (one per decode rank) sent its transfer info."""
    return room.infos_got >= room.infos_needed


def all_chunks_done(room: Room) -> bool:
    """Every expected chunk is confirmed and the end of the room (aux) arrived.

    ``aux_done`` is only set by the chunk that ends the room, so a room whose
    pages were all in decode's cached prefix (zero pages expected) completes on it.
    """
    return room.chunks_done >= room.chunks_needed and room.aux_done


@dataclass(frozen=True)
class Rule:
    """One row of a transition table: ``source --event[guard]--> dest``.

    ``dest`` of ``None`` is an internal transition (the state does not change,
    no enter/exit hooks run).  Rules for the same (source, event) are tried in
    order; the first whose guard holds wins.
    """

    source: KVPoll
    event: Event
    dest: KVPoll | None
    guard: Callable[[Room], bool] | None = None
    cleanup: bool = False  # run the room cleanup after this transition


B, W, T, S, F = (
    KVPoll.Bootstrapping,
    KVPoll.WaitingForInput,
    KVPoll.Transferring,
    KVPoll.Success,
    KVPoll.Failed,
)


def _failing(states: tuple[KVPoll, ...]) -> list[Rule]:
    return [Rule(s, e, F) for s in states for e in FAILING_EVENTS]


RULES: dict[Role, tuple[Rule, ...]] = {
    Role.SENDER: (
        Rule(B, Event.DST_INFO, W, all_dst_infos),
        Rule(B, Event.DST_INFO, None),
        Rule(W, Event.SEND, T),
        Rule(T, Event.SEND, None),
        Rule(T, Event.COMPLETE, S, all_chunks_done),
        Rule(S, Event.CLEAR, None, cleanup=True),
        *_failing(NON_TERMINAL),
    ),
    Role.RECEIVER: (
        Rule(B, Event.METADATA_SENT, W),
        Rule(W, Event.CHUNK_ARRIVED, T),
        Rule(T, Event.CHUNK_ARRIVED, None),
        Rule(T, Event.COMPLETE, S, all_chunks_done),
        Rule(S, Event.CLEAR, None, cleanup=True),
        *_failing(NON_TERMINAL),
    ),
}
"""The complete transition tables.  Anything not listed is not a transition."""


class Hooks:
    """The callbacks the declared machines run; the room table installs itself.

    ``transitions`` calls hooks with whatever arguments ``trigger`` got; both
    engines pass the room as the only argument.
    """

    @staticmethod
    def enter_failed(room: Room) -> None:
        """``on_enter`` of Failed: the one cleanup of every store."""
        room.owner.cleanup(room)

    @staticmethod
    def cleanup_after(room: Room) -> None:
        """``after`` hook of ``clear`` on a successful room: the same cleanup."""
        room.owner.cleanup(room)


def build_machine(role: Role, machine_cls: type[Machine] = Machine, **options: Any) -> Machine:
    """Parse ``RULES[role]`` into a ``transitions`` Machine with no model attached.

    States are the ``KVPoll`` members; events are ``Event`` values; guards and
    hooks are passed as callables (no string lookups on a model).
    ``machine_cls`` and ``options`` let :mod:`kvroom.observe.diagrams` build a
    ``GraphMachine`` from the very same declaration.
    """
    states = [State(s.name, on_enter=[Hooks.enter_failed] if s is KVPoll.Failed else None) for s in KVPoll]
    transitions: list[dict[str, Any]] = []
    for rule in RULES[role]:
        t: dict[str, Any] = {
            "trigger": rule.event.value,
            "source": rule.source.name,
            "dest": rule.dest.name if rule.dest is not None else None,
        }
        if rule.guard is not None:
            t["conditions"] = [rule.guard]
        if rule.cleanup:
            t["after"] = [Hooks.cleanup_after]
        transitions.append(t)
    return machine_cls(
        model=None,
        states=states,
        transitions=transitions,
        initial=KVPoll.Bootstrapping.name,
        auto_transitions=False,
        ignore_invalid_triggers=False,
        send_event=False,
        name=f"kvroom-{role.value}",
        **options,
    )


MACHINES: dict[Role, Machine] = {role: build_machine(role) for role in Role}
"""One parsed machine per role, built once at import."""
