"""kvroom as SGLang's transfer backend: one prefill and one decode process, driven through SGLang's code.

Plugin loading, ``get_kv_class`` for the name ``kvroom``, SGLang's HTTP bootstrap
server, ``KVArgs`` filled like ``_init_kv_manager`` (MHA pools as CPU tensors,
``MetadataBuffers`` as aux), ``poll_and_all_reduce`` on a gloo group; and the
sender contract as SGLang's own unit tests describe it (chunking and the last
chunk, a zero-page last chunk, abort and timeout latching).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("sglang")

from tests.integrations.sglang.cluster import Cluster, Node
from tests.integrations.sglang.node import PAGE_SIZE, PAGES, TERMINAL

pytestmark = pytest.mark.slow

WAITING_DEADLINE = 8.0  # seconds a room may wait for its first chunk (the timeout-latching test)
ROOMS = itertools.count(1001)


@pytest.fixture(scope="module")
def audit_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The JSON-lines file both processes' audit events go to (through SGLang's logging)."""
    return tmp_path_factory.mktemp("audit") / "kvroom-audit.jsonl"


@pytest.fixture(scope="module")
def pair(audit_log: Path) -> Iterator[tuple[Node, Node, str]]:
    env = {"SGLANG_DISAGGREGATION_WAITING_TIMEOUT": str(WAITING_DEADLINE), "KVROOM_AUDIT_LOG": str(audit_log)}
    cluster = Cluster(env=env)
    try:
        yield cluster.prefill[0], cluster.decodes[0][0], cluster.addr
    finally:
        cluster.close()


def open_room(prefill: Node, decode: Node, addr: str, dst: list[int], aux: int, prefix_pages: int = 0) -> int:
    """A room bootstrapped on both sides (prefill WaitingForInput); returns its id."""
    room = next(ROOMS)
    decode.call("receiver", room, addr, dst, aux, prefix_pages * PAGE_SIZE)
    prefill.call("sender", room)
    assert prefill.call("wait", [room], ["WaitingForInput"], 30) == {room: "WaitingForInput"}
    return room


def assert_clean(node: Node, room: int) -> None:
    assert node.call("footprint", room) == [], f"{node.name} still holds room {room}"


def test_the_plugin_makes_kvroom_a_backend_name_with_kvroom_classes(pair: tuple[Node, Node, str]) -> None:
    prefill, _, _ = pair
    names = prefill.call("class_names")
    assert names == {
        "kvargs": "sglang.srt.disaggregation.base.conn.KVArgs",
        "manager": "kvroom.integrations.sglang.manager.KvroomKVManager",
        "sender": "kvroom.integrations.sglang.conn.KvroomKVSender",
        "receiver": "kvroom.integrations.sglang.conn.KvroomKVReceiver",
        "bootstrap_server": "kvroom.integrations.sglang.bootstrap.KvroomKVBootstrapServer",
    }


# (tokens, decode prefix pages, chunk sizes in pages; the last chunk may be empty)
REQUESTS = [
    (1, 0, [1]),
    (4, 0, [1]),
    (13, 0, [2, 2]),
    (37, 0, [3, 3, 3, 1]),
    (37, 2, [4, 4]),
    (16, 4, [0]),  # decode holds everything: one zero-page last chunk
    (24, 1, [3, 2, 0]),  # an empty chunk after the pages completed: a no-op
]


@pytest.mark.parametrize(("tokens", "prefix", "chunks"), REQUESTS)
def test_requests_arrive_byte_identical_with_their_aux_row(
    pair: tuple[Node, Node, str], tokens: int, prefix: int, chunks: list[int]
) -> None:
    prefill, decode, addr = pair
    pages = -(-tokens // PAGE_SIZE)
    suffix = pages - prefix
    assert sum(chunks) == suffix
    dst = list(range(PAGES - suffix, PAGES))[::-1]  # decode pages, reversed: any order works
    src = list(range(1, 1 + suffix))
    room = open_room(prefill, decode, addr, dst, aux=5, prefix_pages=prefix)
    assert prefill.call("begin", room, tokens, 2) == prefix * PAGE_SIZE
    offset = 0
    for n, size in enumerate(chunks):
        last = n == len(chunks) - 1
        assert prefill.call("chunk", room, src[offset : offset + size], last) is True
        offset += size
    assert prefill.call("wait", [room], list(TERMINAL), 30) == {room: "Success"}
    assert decode.call("wait", [room], list(TERMINAL), 30) == {room: "Success"}
    assert decode.call("holds", dst, src)
    assert decode.call("aux", 5) == (room, room % 1000 + 1)
    metric = prefill.call("metric", room)
    assert metric["bytes"] == suffix * 2 * 2 * PAGE_SIZE * 4 * 8 * 4  # pages x K,V x layers x page bytes
    assert metric["latency"] is not None and metric["latency"] >= 0
    for node in (prefill, decode):
        node.call("clear", room, times=2)  # clear() is safe to call again
        assert_clean(node, room)


def test_a_non_last_empty_chunk_is_skipped(pair: tuple[Node, Node, str]) -> None:
    prefill, decode, addr = pair
    room = open_room(prefill, decode, addr, [40, 41], aux=1)
    prefill.call("begin", room, 8, 1)
    assert prefill.call("chunk", room, [], False) is False  # should_send_kv_chunk(0, False)
    assert prefill.call("chunk", room, [3, 4], True) is True
    assert prefill.call("wait", [room], list(TERMINAL), 30) == {room: "Success"}
    assert decode.call("wait", [room], list(TERMINAL), 30) == {room: "Success"}
    assert decode.call("holds", [40, 41], [3, 4])
    for node in (prefill, decode):
        node.call("clear", room)


@pytest.mark.parametrize("side", ["prefill", "decode"])
def test_an_abort_fails_the_room_on_both_sides_and_latches(pair: tuple[Node, Node, str], side: str) -> None:
    prefill, decode, addr = pair
    room = open_room(prefill, decode, addr, [30, 31, 32], aux=3)
    prefill.call("begin", room, 12, 3)
    prefill.call("chunk", room, [7], False)
    (prefill if side == "prefill" else decode).call("abort", room)
    assert prefill.call("wait", [room], list(TERMINAL), 30) == {room: "Failed"}
    assert decode.call("wait", [room], list(TERMINAL), 30) == {room: "Failed"}
    prefill.call("chunk", room, [8, 9], True)  # a chunk after the abort changes nothing
    for node in (prefill, decode):
        assert node.call("wait", [room], ["Failed"], 1) == {room: "Failed"}  # latched
        assert_clean(node, room)  # clean before failure_exception() is even called
        failure = node.call("failure", room)
        assert failure["type"] == "KVTransferError", failure
        assert failure["another_rank"] is False
        assert failure["cause"] is not None and "abort" in failure["reason"].lower(), failure
    assert decode.call("release_safe", room)  # decode's pages are reusable at once
    for node in (prefill, decode):
        node.call("clear", room, times=2)


def test_a_room_that_never_gets_a_chunk_fails_by_its_deadline_and_latches(
    pair: tuple[Node, Node, str],
) -> None:
    prefill, decode, addr = pair
    room = open_room(prefill, decode, addr, [20, 21], aux=4)
    prefill.call("begin", room, 8, 4)
    got = prefill.call("wait", [room], list(TERMINAL), WAITING_DEADLINE + 30)
    assert got == {room: "Failed"}
    failure = prefill.call("failure", room)
    # whichever side's deadline fires first: prefill's own, or decode's abort carrying it
    assert failure["cause"] in ("DeadlineExceededError", "RemoteFailureError"), failure
    assert "deadline" in failure["reason"], failure
    assert decode.call("wait", [room], list(TERMINAL), 30) == {room: "Failed"}
    assert prefill.call("wait", [room], ["Failed"], 1) == {room: "Failed"}
    for node in (prefill, decode):
        assert_clean(node, room)
        node.call("clear", room, times=2)


def test_failure_exception_on_a_live_room_blames_another_rank_and_aborts(
    pair: tuple[Node, Node, str],
) -> None:
    prefill, decode, addr = pair
    room = open_room(prefill, decode, addr, [25, 26], aux=6)
    failure = prefill.call("failure", room)  # what a rank sees when the MIN-reduced poll was Failed
    assert failure["type"] == "KVTransferError" and failure["another_rank"] is True, failure
    assert decode.call("wait", [room], list(TERMINAL), 30) == {room: "Failed"}
    for node in (prefill, decode):
        assert node.call("wait", [room], list(TERMINAL), 30) == {room: "Failed"}
        assert_clean(node, room)
        node.call("clear", room)


def test_sglangs_decode_transfer_queue_pops_finished_requests_and_frees_failed_ones(
    pair: tuple[Node, Node, str],
) -> None:
    prefill, decode, addr = pair
    ok = open_room(prefill, decode, addr, [33, 34], aux=6)
    failed = open_room(prefill, decode, addr, [35, 36], aux=7)
    for room, aux in ((ok, 6), (failed, 7)):
        decode.call("queue_add", room, aux)
        prefill.call("begin", room, 8, aux)
    state = decode.call("queue_pop")
    assert state["popped"] == [] and state["queued"] == [ok, failed]  # nothing has landed yet
    prefill.call("chunk", ok, [3, 4], True)
    prefill.call("chunk", failed, [5], False)
    prefill.call("abort", failed)
    for _ in range(2000):
        state = decode.call("queue_pop")
        if not state["queued"]:
            break
    assert state["committed"] == [ok] and state["released"] == [failed], state
    assert sorted(state["freed"]) == [6, 7]  # both metadata rows back to SGLang's allocator
    assert state["deferred"] == 0  # a failed kvroom room holds no WRITE: pages free at once
    assert decode.call("holds", [33, 34], [3, 4])
    for room in (ok, failed):
        assert_clean(decode, room)
        prefill.call("wait", [room], list(TERMINAL), 30)
        prefill.call("clear", room)
        assert_clean(prefill, room)


def test_the_audit_log_written_through_sglangs_logging_replays_clean(
    pair: tuple[Node, Node, str], audit_log: Path
) -> None:
    """Runs last in this module: every room above is terminal and cleared on both sides."""
    from kvroom.observe.replay import replay

    prefill, decode, _ = pair
    assert prefill.call("live_rooms") == 0 and decode.call("live_rooms") == 0
    for _ in range(100):  # the background writers render within ~50 ms
        report = replay(audit_log.read_text().splitlines())
        if report.ok:
            break
        time.sleep(0.1)
    assert report.ok, report.to_json()
    assert report.rooms >= 2 * 12 and report.success and report.failed, report.to_json()
