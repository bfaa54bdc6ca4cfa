"""The sides' use of the planner, without processes: state rows, notifications, decode's sources."""

from __future__ import annotations

import pytest

from kvroom.node.shares import decode_sources, state_rows
from kvroom.planning import RankRegions, group_ranks, synthetic_pool
from kvroom.transport.codec import MAGIC, ProtocolError, decode, encode
from kvroom.transport.notif import Notif, notif_message, parse_notif, parse_notifs
from tests.families import _family


def regions(family: str, tp: int = 1, pp: tuple[int, int] = (0, 1)) -> RankRegions:
    (layout,) = [r for r in group_ranks(_family(family), tp, pp[1]) if r.pp_rank == pp[0]][:1]
    return RankRegions(layout, synthetic_pool(layout, {"kv": 8, "swa": 8, "aux": 4, "mamba": 4}))


def test_state_rows_are_validated_per_space_and_dropped_where_a_stage_holds_none() -> None:
    hybrid = regions("hybrid")
    assert {k: v.tolist() for k, v in state_rows({"mamba": [3], "swa": [1, 2]}, hybrid, "r").items()} == {
        "mamba": [3],
        "swa": [1, 2],
    }
    with pytest.raises(ValueError, match=r"r state 'mamba': page index 4 out of range for a pool of 4"):
        state_rows({"mamba": [4]}, hybrid, "r")
    with pytest.raises(ValueError, match="no state space 'ssm'"):
        state_rows({"ssm": [0]}, hybrid, "r")
    with pytest.raises(ValueError, match="must be a dict keyed by state space"):
        state_rows([0], hybrid, "r")
    with pytest.raises(ValueError, match="the model has no state buffers"):
        state_rows([0], regions("gqa"), "r")
    assert state_rows(None, hybrid, "r") == {}
    stage = regions("hybrid", 1, (1, 2))  # layers 2-3: mamba at 2, sliding window at 3
    assert set(state_rows({"mamba": [1], "swa": [0]}, stage, "r")) == {"mamba", "swa"}
    first = regions("hybrid", 1, (0, 2))  # layers 0-1: no sliding-window buffer
    assert set(state_rows({"mamba": [1], "swa": [0]}, first, "r")) == {"mamba"}


def test_decode_sources_count_pages_only_from_ranks_that_write_pages() -> None:
    model = _family("gqa")
    decode = group_ranks(model, 4)[1]  # holds a replica of head 0
    sources = decode_sources(decode, group_ranks(model, 2), lambda s: False)
    assert [(s.writes, s.pages) for s in sources] == [(True, True), (True, False)]  # rank 1: aux only
    mla = _family("mla")
    sources = decode_sources(group_ranks(mla, 2)[0], group_ranks(mla, 4), lambda s: False)
    assert [s.writes for s in sources] == [True, False, False, False]


def test_notifications_and_room_state_rows_on_the_wire() -> None:
    assert parse_notif(notif_message(7, 3, 16, 0, True)) == Notif(7, 3, 16, 0, True)
    joined = b";".join([notif_message(7, 3, 16, 0, True), notif_message(9, 0, 0, 4, False)])
    assert parse_notifs(joined) == [Notif(7, 3, 16, 0, True), Notif(9, 0, 0, 4, False)]
    assert parse_notifs(notif_message(1, 0, 0, 2, False)) == [Notif(1, 0, 0, 2, False)]
    for bad_joined in (joined + b";", joined + b";kvr2:1:x:0:0:1", b";" + joined, b""):
        assert parse_notifs(bad_joined) == []  # one malformed entry: the whole message is not ours
    fields = {"room": 1, "aux_index": None, "prefix_pages": 0, "npages": 0, "staging": None, "chunk_pages": 4}
    assert decode(encode("room", fields), 1 << 20).fields["state"] is None  # may be left out
    frames = encode("room", {**fields, "state": {"mamba": [1]}})
    assert decode(frames, 1 << 20).fields["state"] == {"mamba": [1]}
    bad = [MAGIC, frames[1].replace(b"[1]", b'["x"]'), frames[2]]
    with pytest.raises(ProtocolError, match="state rows must be lists of ints"):
        decode(bad, 1 << 20)
