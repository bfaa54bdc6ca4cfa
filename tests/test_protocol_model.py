"""The room protocol, sans-I/O: one prefill (the coordinator) and 1-3 decode ranks.

With one decode rank the prefill commits alone (protocol 8): the announcement
of the WRITE whose completion made the room Success, sent at DONE once
counted, is the commit (a room that Failed first never gets one), and travels
in order on the control link (the other announcements stay looser); with
more, the votes and COMMIT decide.

Every rank runs the real room table (:mod:`kvroom.fsm`) and the real per-room
protocol (:mod:`kvroom.protocol.rooms`); only the wire is simulated: FIFO
control links per direction, WRITEs that land before their handle reports
DONE, and their announcements (WRITTEN on the wire, sent at DONE on the link
that carries COMMIT and FAILED) arriving in any order, independently of the
control links, as soon as the WRITE landed: looser than the wire allows, so
what holds here holds there.  Hypothesis interleaves deliveries with deadlines, aborts,
stalls (a peer may declare a stalled rank lost) and process deaths, then lets
the system settle and checks:

* no room is left non-terminal on a live rank, and no state is left behind;
* while every process is alive, every rank of both sides has the same verdict;
* when a process died, a Success anywhere means the coordinator committed;
* no WRITE ever lands in a decode room that already reported Failed.

A WRITE lands only while its prefill runs: UCX moves the bytes from the
initiator's progress, and what was already on the wire when a process stopped
or died arrives long before any heartbeat timeout.  (A prefill paused past the
heartbeat timeout could still finish WRITEs it posted before the pause when it
resumes: NIXL cannot cancel them.  The model leaves that out; README says so.)
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvroom.fsm import Event, KVPoll, Role, RoomStore, RoomTable
from kvroom.fsm.room import Room
from kvroom.protocol import DecodeVerdict, Fire, Input, Msg, PrefillVerdict, Send

P = "P"
ROOMS = (1, 2, 3)


@dataclass
class Write:
    """One WRITE posted by the prefill to decode rank ``dst``."""

    room: int
    dst: str
    last: bool  # ends this decode rank's share
    ends_room: bool  # the last WRITE of the room
    landed: bool = False


@dataclass
class Rank:
    """One process: its table, its verdicts, and what it knows of its peers."""

    name: str
    table: RoomTable
    verdicts: RoomStore[Any] = field(default_factory=lambda: RoomStore("verdicts"))
    alive: bool = True
    stalled: bool = False
    declared_lost_by: set[str] = field(default_factory=set)  # peers that gave up on it while stalled
    forgotten: set[str] = field(default_factory=set)  # peers it declared lost


class Model(RuleBasedStateMachine):
    """The simulated cluster."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.links: dict[tuple[str, str], collections.deque[tuple[Msg, int, str]]] = {}
        self.notifs: dict[str, list[Write]] = {}
        self.writes: list[Write] = []
        self.ranks: dict[str, Rank] = {}
        self.deaths = False
        self.committed: set[int] = set()  # rooms the coordinator committed
        self.landed_in_failed: list[tuple[str, int]] = []
        self.tombstones: set[int] = set()
        self.arrived: collections.Counter[tuple[str, int]] = collections.Counter()
        self.ended: set[tuple[str, int]] = set()
        self.commit_seen: set[tuple[str, int]] = set()  # commit announcements decode ranks saw

    # -- set-up ----------------------------------------------------------------------

    @initialize(n=st.integers(1, 3), chunks=st.integers(1, 2))
    def setup(self, n: int, chunks: int) -> None:
        self.chunks = chunks
        self.decodes = [f"D{j}" for j in range(n)]
        self.ranks[P] = Rank(P, RoomTable(Role.SENDER))
        for d in self.decodes:
            self.ranks[d] = Rank(d, RoomTable(Role.RECEIVER))
            self.links[(P, d)] = collections.deque()
            self.links[(d, P)] = collections.deque()
            self.notifs[d] = []
        for rank in self.ranks.values():
            rank.table.register_store(rank.verdicts)  # cleaned with the room, like every store
        for room_id in ROOMS:
            room = self.ranks[P].table.create(room_id, self.now)
            room.infos_needed = n
            self.ranks[P].verdicts.put(room, PrefillVerdict(room_id, coordinator=True))
            for d in self.decodes:
                droom = self.ranks[d].table.create(room_id, self.now, peers=(P,))
                self.ranks[d].verdicts.put(droom, DecodeVerdict(room_id, (P,)))
        self.sent_metadata: set[tuple[str, int]] = set()

    # -- helpers ---------------------------------------------------------------------

    def tick(self) -> float:
        self.now += 0.001
        return self.now

    def running(self, name: str) -> bool:
        rank = self.ranks[name]
        return rank.alive and not rank.stalled

    def send(self, src: str, dst: str, msg: Msg, room: int, reason: str = "") -> None:
        """Queue a message; room traffic goes only to peers the sender still knows, and a
        decode rank that gave up on the prefill closed its socket."""
        if not self.ranks[src].alive or (src in self.ranks[dst].forgotten and dst != P):
            return
        if msg is Msg.UNKNOWN or dst not in self.ranks[src].forgotten:
            self.links[(src, dst)].append((msg, room, reason))

    def verdict(self, name: str, room_id: int) -> Any:
        verdict = self.ranks[name].verdicts.get(room_id)
        assert verdict is not None, (name, room_id)
        return verdict

    def live_room(self, name: str, room_id: int) -> Room | None:
        return self.ranks[name].table.get(room_id)

    def execute(self, name: str, room: Room, actions: list[Fire | Send]) -> None:
        table = self.ranks[name].table
        for action in actions:
            if isinstance(action, Fire):
                before = room.state
                table.fire(room, action.event, self.tick(), error=action.error, reason=action.reason,
                           chunks=action.chunks)  # fmt: skip
                self.after_transition(name, room, before)
            else:
                self.send(name, action.to, action.msg, room.id, action.reason)

    def after_transition(self, name: str, room: Room, before: KVPoll) -> None:
        """The prefill's observer hook: the commit, or FAILED once its WRITEs drained."""
        if name != P or before is room.state:
            return
        if room.state is KVPoll.Success:
            self.committed.add(room.id)
            if not self.verdict(P, room.id).alone:  # alone, the last WRITTEN carries the commit
                for d in room.peers:
                    self.send(P, d, Msg.COMMIT, room.id)
        elif room.state is KVPoll.Failed:
            self.tombstones.add(room.id)
            self.pending_failed.setdefault(room.id, set(room.peers))
            self.flush_failed()

    @property
    def pending_failed(self) -> dict[int, set[str]]:
        if not hasattr(self, "_pending_failed"):
            self._pending_failed: dict[int, set[str]] = {}
        return self._pending_failed

    def flush_failed(self) -> None:
        """FAILED goes out only once none of the room's WRITEs is in flight."""
        for room_id, peers in list(self.pending_failed.items()):
            if not any(w.room == room_id for w in self.writes):
                del self.pending_failed[room_id]
                for d in peers:
                    self.send(P, d, Msg.FAILED, room_id, "prefill failed")

    def prefill_input(self, room: Room, inp: Input, rank: str | None = None, **kw: Any) -> None:
        verdict = self.verdict(P, room.id)
        outcome = verdict.on(room.state, inp, rank, reason=str(inp.value), **kw)
        self.execute(P, room, list(outcome.actions))

    def decode_input(self, name: str, room: Room, inp: Input, rank: str | None = None) -> None:
        verdict = self.verdict(name, room.id)
        outcome = verdict.on(room.state, inp, rank, reason=str(inp.value))
        self.execute(name, room, list(outcome.actions))

    # -- receiving -------------------------------------------------------------------

    def prefill_receives(self, src: str, msg: Msg, room_id: int) -> None:
        rank = self.ranks[P]
        if src in rank.forgotten:
            self.send(P, src, Msg.UNKNOWN, room_id)
            return
        if msg is Msg.PING:
            return
        room = rank.table.get(room_id)
        if room is None:
            if src in self.pending_failed.get(room_id, ()):
                return  # draining: FAILED follows once no WRITE of the room can land
            if msg is Msg.ABORT or (msg is Msg.ROOM and room_id in self.tombstones):
                self.tombstones.add(room_id)
                self.send(P, src, Msg.FAILED, room_id, "no such room")
            return
        if msg is Msg.ROOM:
            if room.state is KVPoll.Bootstrapping and src not in room.peers:
                room.peers = (*room.peers, src)
                before = room.state
                rank.table.fire(room, Event.DST_INFO, self.tick(), infos=1)
                self.after_transition(P, room, before)
        elif msg is Msg.READY and src in room.peers:
            self.prefill_input(room, Input.READY, src)
        elif msg is Msg.ABORT:
            self.prefill_input(room, Input.ABORT, src)

    def decode_receives(self, name: str, msg: Msg, room_id: int) -> None:
        if msg is Msg.UNKNOWN:
            self.decode_loses(name, P)
            return
        room = self.live_room(name, room_id)
        if room is None:
            return
        if msg is Msg.FAILED:
            self.decode_input(name, room, Input.FAILED, P)
        elif msg is Msg.COMMIT:
            self.decode_input(name, room, Input.COMMIT, P)
        elif msg is Msg.WRITTEN:  # only the commit travels here (see complete)
            self.commit_seen.add((name, room_id))
            self.all_in(name, room)

    def decode_loses(self, name: str, peer: str) -> None:
        rank = self.ranks[name]
        if peer in rank.forgotten:
            return
        rank.forgotten.add(peer)
        self.links[(peer, name)].clear()  # its socket is closed: nothing more arrives
        for room in rank.table.live_rooms():
            self.decode_input(name, room, Input.PEER_LOST, peer)

    def prefill_loses(self, peer: str) -> None:
        rank = self.ranks[P]
        if peer in rank.forgotten:
            return
        rank.forgotten.add(peer)
        for w in [w for w in self.writes if w.dst == peer]:
            self.writes.remove(w)  # released: NIXL raised for the dead peer
        for room in rank.table.live_rooms():
            if peer in room.peers:
                left = sum(1 for d in room.peers if d not in rank.forgotten)
                self.prefill_input(room, Input.PEER_LOST, peer, ranks_left=left)
        self.flush_failed()

    # -- rules: the schedulers ---------------------------------------------------------

    @rule(name=st.sampled_from(["D0", "D1", "D2"]), room_id=st.sampled_from(ROOMS))
    def decode_sends_metadata(self, name: str, room_id: int) -> None:
        if name not in self.ranks:
            return
        room = self.live_room(name, room_id)
        if not self.running(name) or room is None or (name, room_id) in self.sent_metadata:
            return
        if room.state is not KVPoll.Bootstrapping or P in self.ranks[name].forgotten:
            return
        self.sent_metadata.add((name, room_id))
        verdict = self.verdict(name, room_id)
        verdict.sent, verdict.writers = True, frozenset({P})
        room.chunks_needed = self.chunks + 1  # every chunk, then the commit
        self.send(name, P, Msg.ROOM, room_id)
        self.ranks[name].table.fire(room, Event.METADATA_SENT, self.tick())

    @rule(room_id=st.sampled_from(ROOMS))
    def prefill_sends(self, room_id: int) -> None:
        room = self.live_room(P, room_id)
        if not self.running(P) or room is None or room.state is not KVPoll.WaitingForInput:
            return
        self.ranks[P].table.fire(room, Event.SEND, self.tick())
        verdict = self.verdict(P, room_id)
        targets = [d for d in room.peers if d not in self.ranks[P].forgotten]
        room.chunks_needed += len(targets) * self.chunks + verdict.needed(len(room.peers), 1, bool(targets))
        self.prefill_input(room, Input.DELIVERED)
        for i, d in enumerate(targets):
            for c in range(self.chunks):
                last = c == self.chunks - 1
                self.writes.append(Write(room_id, d, last, last and i == len(targets) - 1))

    @rule()
    def schedulers_progress(self) -> None:
        """Every decode scheduler sends the page lists it can, the prefill every chunk it can."""
        for room_id in ROOMS:
            for d in self.decodes:
                self.decode_sends_metadata(d, room_id)
            self.prefill_sends(room_id)

    @rule(data=st.data())
    def deadline_or_abort(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from([P, *self.decodes]))
        live = [r for r in self.ranks[name].table.live_rooms() if r.state is not KVPoll.Success]
        if not self.running(name) or not live:
            return
        room = data.draw(st.sampled_from(sorted(live, key=lambda r: r.id)))
        inp = data.draw(st.sampled_from([Input.DEADLINE, Input.LOCAL_ABORT]))
        if name == P:
            self.prefill_input(room, inp)
        else:
            self.decode_input(name, room, inp)

    # -- rules: the wire -------------------------------------------------------------------

    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        busy = [k for k, q in self.links.items() if q and self.running(k[1])]
        if not busy:
            return
        src, dst = data.draw(st.sampled_from(sorted(busy)))
        self.receive_next(src, dst)

    def receive_next(self, src: str, dst: str) -> None:
        msg, room_id, _reason = self.links[(src, dst)].popleft()
        if dst == P:
            self.prefill_receives(src, msg, room_id)
        else:
            self.decode_receives(dst, msg, room_id)

    @rule(data=st.data())
    def land(self, data: st.DataObject) -> None:
        """A WRITE's bytes land in decode's pages; its notification is on its way."""
        pending = [w for w in self.writes if not w.landed and self.ranks[w.dst].alive and self.running(P)]
        if not pending:
            return
        self.land_write(data.draw(st.sampled_from(pending)))

    def land_write(self, w: Write) -> None:
        w.landed = True
        room = self.ranks[w.dst].table.get(w.room)
        if room is None or room.state is KVPoll.Failed:
            self.landed_in_failed.append((w.dst, w.room))
        self.notifs[w.dst].append(w)  # announcements may arrive as soon as the bytes landed

    @rule(data=st.data())
    def write_done(self, data: st.DataObject) -> None:
        """The prefill polls a landed WRITE as DONE and releases it."""
        landed = [w for w in self.writes if w.landed]
        if not landed or not self.running(P):
            return
        self.complete(data.draw(st.sampled_from(landed)))
        self.flush_failed()

    @rule(data=st.data())
    def notify(self, data: st.DataObject) -> None:
        ready = [d for d in self.decodes if self.notifs[d] and self.running(d)]
        if not ready:
            return
        name = data.draw(st.sampled_from(ready))
        self.notify_one(name, data.draw(st.integers(0, len(self.notifs[name]) - 1)))

    @rule()
    def everything_moves_one_step(self) -> None:
        """Every link delivers one message, every WRITE lands, every notification and
        completion arrives: reaches deep states (votes, commits) in few steps."""
        for (src, dst), q in list(self.links.items()):
            if q and self.running(dst):
                self.receive_next(src, dst)
        for w in [w for w in self.writes if not w.landed and self.ranks[w.dst].alive and self.running(P)]:
            self.land_write(w)
        for d in self.decodes:
            while self.notifs[d] and self.running(d):
                self.notify_one(d)
        if self.running(P):
            for w in [w for w in self.writes if w.landed]:
                self.complete(w)
            self.flush_failed()

    def complete(self, w: Write) -> None:
        self.writes.remove(w)
        room = self.live_room(P, w.room)
        if room is not None:
            before = room.state
            self.ranks[P].table.fire(room, Event.COMPLETE, self.tick(), chunks=1, aux=w.ends_room)
            self.after_transition(P, room, before)
            if (
                room.state is KVPoll.Success
                and before is not KVPoll.Success
                and self.verdict(P, w.room).alone
            ):
                # committed alone: the commit rides on this WRITE's announcement, sent at DONE
                # on the control link (the model lets the other announcements arrive earlier)
                self.send(P, w.dst, Msg.WRITTEN, w.room)

    # -- rules: stalls and deaths -------------------------------------------------------

    @precondition(lambda self: not self.deaths)
    @rule(data=st.data())
    def stall(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from([P, *self.decodes]))
        self.ranks[name].stalled = True

    @rule(data=st.data())
    def declare_stalled_lost(self, data: st.DataObject) -> None:
        """A running peer gives up on a stalled one, after hearing everything it had sent."""
        stalled = [n for n, r in self.ranks.items() if r.stalled and r.alive]
        if not stalled:
            return
        name = data.draw(st.sampled_from(stalled))
        observers = [P] if name != P else self.decodes
        observer = data.draw(st.sampled_from(observers))
        if not self.running(observer) or self.links[(name, observer)]:
            return
        self.ranks[name].declared_lost_by.add(observer)
        if observer == P:
            self.prefill_loses(name)
        else:
            self.decode_loses(observer, P)

    @rule(data=st.data())
    def resume(self, data: st.DataObject) -> None:
        stalled = [n for n, r in self.ranks.items() if r.stalled and r.alive]
        if stalled:
            self.resume_rank(data.draw(st.sampled_from(stalled)), data.draw(st.booleans()))

    def resume_rank(self, name: str, long: bool) -> None:
        rank = self.ranks[name]
        rank.stalled = False
        if not (long or rank.declared_lost_by):
            return
        if name == P:  # the prefill's stall watch: a peer may have given up on it, trust none
            for d in self.decodes:
                self.prefill_loses(d)
        else:
            self.decode_pings(name)
        rank.declared_lost_by.clear()

    @rule(name=st.sampled_from(["D0", "D1", "D2"]))
    def decode_pings(self, name: str) -> None:
        """A heartbeat: a prefill that forgot this decode answers UNKNOWN."""
        if name in self.ranks and self.running(name) and P not in self.ranks[name].forgotten:
            self.send(name, P, Msg.PING, 0)

    @rule(data=st.data())
    def kill(self, data: st.DataObject) -> None:
        if data.draw(st.integers(0, 3)):  # deaths are rarer than other events
            return
        name = data.draw(st.sampled_from([P, *self.decodes]))
        self.ranks[name].alive = False
        self.deaths = True
        for key in [k for k in self.links if k[0] == name]:
            if data.draw(st.booleans()):
                self.links[key].clear()  # what it had sent may or may not still arrive

    # -- settling and the checks ------------------------------------------------------------

    def settle(self) -> None:
        """Let every pending thing happen: time passes, deaths are noticed, all is delivered."""
        for name in list(self.ranks):
            if self.ranks[name].stalled:
                self.resume_rank(name, long=False)
        for _ in range(200):
            progressed = False
            for name, rank in self.ranks.items():
                if rank.alive:
                    continue
                if name == P:
                    for d in self.decodes:
                        if self.ranks[d].alive and P not in self.ranks[d].forgotten:
                            self.decode_loses(d, P)
                            progressed = True
                elif name not in self.ranks[P].forgotten and self.ranks[P].alive:
                    self.prefill_loses(name)
                    progressed = True
            for (src, dst), q in self.links.items():
                while q and self.ranks[dst].alive:
                    self.receive_next(src, dst)
                    progressed = True
            for w in list(self.writes):
                if not w.landed and self.ranks[w.dst].alive and self.running(P):
                    self.land_write(w)
                    progressed = True
            for d in self.decodes:
                while self.notifs[d] and self.ranks[d].alive:
                    self.notify_one(d)
                    progressed = True
            if self.ranks[P].alive:
                for w in [w for w in self.writes if w.landed]:
                    self.complete(w)
                    progressed = True
                self.flush_failed()
            for d in self.decodes:  # heartbeats go on: a forgotten decode learns it
                if self.running(d) and d in self.ranks[P].forgotten and P not in self.ranks[d].forgotten:
                    self.decode_pings(d)
                    progressed = True
            if progressed:
                continue
            # nothing else moves: the schedulers act, then deadlines pass on every live rank
            for room_id in ROOMS:
                for d in self.decodes:
                    room = self.live_room(d, room_id)
                    unsent = room is not None and (d, room_id) not in self.sent_metadata
                    if unsent and room.state is KVPoll.Bootstrapping and self.running(d):
                        self.decode_sends_metadata(d, room_id)
                        progressed = (d, room_id) in self.sent_metadata or progressed
                room = self.live_room(P, room_id)
                if self.ranks[P].alive and room is not None and room.state is KVPoll.WaitingForInput:
                    self.prefill_sends(room_id)
                    progressed = True
            if progressed:
                continue
            for name, rank in self.ranks.items():
                for room in rank.table.live_rooms() if rank.alive else []:
                    if room.state in (KVPoll.Success, KVPoll.Failed):
                        continue
                    if name == P:
                        self.prefill_input(room, Input.DEADLINE)
                    else:
                        self.decode_input(name, room, Input.DEADLINE)
                    progressed = True
            if not progressed:
                return
        raise AssertionError("the protocol did not settle")

    def notify_one(self, name: str, index: int = 0) -> None:
        """Decode rank ``name`` sees the ``index``-th pending notification (any order)."""
        w = self.notifs[name].pop(index)
        if P in self.ranks[name].forgotten:
            return
        room = self.live_room(name, w.room)
        if room is None:
            return
        verdict = self.verdict(name, w.room)
        self.arrived[(name, w.room)] += 1
        self.ended.update({(name, w.room)} if w.last else ())
        if (name, w.room) in self.ended and self.arrived[(name, w.room)] == self.chunks:
            verdict.finished.add(P)  # notifications overtake each other: done only when all arrived
        self.ranks[name].table.fire(
            room, Event.CHUNK_ARRIVED, self.tick(), chunks=1, aux=P in verdict.finished
        )
        self.all_in(name, room)

    def all_in(self, name: str, room: Room) -> None:
        """Every byte of the room is in place at decode rank ``name``: vote, or take the commit."""
        if P not in self.verdict(name, room.id).finished or room.chunks_done < room.chunks_needed - 1:
            return
        if (name, room.id) in self.commit_seen:
            self.decode_input(name, room, Input.COMMITTED_DATA, P)
        else:
            self.decode_input(name, room, Input.ALL_DATA_IN)

    @invariant()
    def no_write_lands_in_a_failed_room(self) -> None:
        assert not self.landed_in_failed, self.landed_in_failed

    def teardown(self) -> None:
        if not self.ranks:
            return
        self.settle()
        assert not self.landed_in_failed, self.landed_in_failed
        verdicts: dict[int, dict[str, KVPoll]] = {r: {} for r in ROOMS}
        for name, rank in self.ranks.items():
            if not rank.alive:
                continue
            for room in rank.table.live_rooms():
                assert room.state is KVPoll.Success, f"{name}: {room} left non-terminal"
            for room_id in ROOMS:
                room = rank.table.get(room_id)
                verdicts[room_id][name] = room.state if room is not None else KVPoll.Failed
                if room is not None:
                    rank.table.fire(room, Event.CLEAR, self.tick())
            assert len(rank.table) == 0
            for room_id in ROOMS:
                assert rank.table.footprint(room_id) == frozenset(), (name, room_id)
        for room_id, seen in verdicts.items():
            if not self.deaths:
                assert len(set(seen.values())) == 1, (room_id, seen)
            elif P in seen:  # the coordinator survived: every surviving decode rank agrees with it
                assert all(v is seen[P] for v in seen.values()), (room_id, seen)
            if KVPoll.Success in seen.values():
                assert room_id in self.committed, (room_id, seen)


Model.TestCase.settings = settings(
    max_examples=1000, stateful_step_count=50, deadline=None, suppress_health_check=list(HealthCheck)
)
TestProtocolModel = Model.TestCase


def _alone_room_posted(chunks: int = 1) -> Model:
    """One decode rank: the page list reached the prefill and its WRITEs are posted."""
    model = Model()
    model.setup(n=1, chunks=chunks)
    model.decode_sends_metadata("D0", 1)
    model.receive_next("D0", P)
    model.prefill_sends(1)
    assert model.verdict(P, 1).alone and len(model.writes) == chunks
    return model


def test_a_room_that_fails_on_prefill_before_its_done_never_announces_the_commit() -> None:
    model = _alone_room_posted()
    model.land_write(model.writes[0])
    model.prefill_input(model.live_room(P, 1), Input.LOCAL_ABORT)  # aborted with the WRITE in flight
    model.complete(model.writes[0])
    assert not model.links[(P, "D0")]  # the last WRITE is DONE, but the room Failed: no commit
    model.flush_failed()
    model.receive_next(P, "D0")
    assert model.live_room("D0", 1) is None  # Failed, and cleaned up
    model.teardown()


def test_a_decode_that_gave_up_after_the_commit_left_still_ends_in_success() -> None:
    model = _alone_room_posted()
    model.land_write(model.writes[0])
    model.complete(model.writes[0])
    assert model.live_room(P, 1).state is KVPoll.Success
    assert list(model.links[(P, "D0")]) == [(Msg.WRITTEN, 1, "")]  # the commit, and no COMMIT message
    model.decode_input("D0", model.live_room("D0", 1), Input.DEADLINE)  # asks for an abort ...
    model.receive_next("D0", P)  # ... which the committed prefill ignores
    model.receive_next(P, "D0")  # the commit arrives (here before its WRITE's bytes are counted)
    assert model.live_room("D0", 1).state is not KVPoll.Success  # the bytes are not counted yet
    model.notify_one("D0")
    assert model.live_room("D0", 1).state is KVPoll.Success
    model.teardown()


def test_the_last_posted_write_done_first_does_not_commit_a_room_that_then_fails() -> None:
    model = _alone_room_posted(chunks=2)
    first, last = model.writes
    for w in (first, last):
        model.land_write(w)
    model.complete(last)  # the room's last WRITE is DONE before its first
    assert model.live_room(P, 1).state is KVPoll.Transferring and not model.links[(P, "D0")]
    model.prefill_input(model.live_room(P, 1), Input.DEADLINE)
    model.complete(first)
    assert not model.links[(P, "D0")]  # Failed before every WRITE was DONE: no commit, ever
    model.teardown()  # every announcement arrives: decode votes, and FAILED fails it too
