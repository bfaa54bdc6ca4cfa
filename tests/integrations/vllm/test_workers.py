"""Worker-side kvroom connectors in separate prefill and decode processes, real NIXL WRITEs
between vLLM-shaped cache tensors, and the push-mode failure cases of vLLM's own connector.

The test plays both schedulers: it hands each process the jobs the scheduler side would
(open a room with these blocks, abort a receive) and steps the connector as vLLM's model
runner does.  Every case ends with both sides reporting the same verdict for each request and
neither holding anything for it.  Timeouts are waits, never timing assertions.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from tests.integrations.vllm.procs import Worker

# each test starts two or three processes that import vLLM (~10 s each on a quiet machine)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BEAT = {"heartbeat_interval": 0.25, "heartbeat_timeout": 4.0}
SRC = [5, 6, 7]  # prefill's blocks of a 3-block request


def dst(k: int) -> list[int]:
    """Decode's blocks for the k-th request."""
    return [10 + 3 * k, 11 + 3 * k, 12 + 3 * k]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start worker processes (``env``: for UCX); every one is killed and reaped when the test ends."""
    from tests.integrations.vllm.harness import model_dir

    model = model_dir(tmp_path / "model")
    made: list[Worker] = []

    def start(name: str, env: dict[str, str] | None = None) -> Worker:
        worker = Worker(name, env)
        worker.model = model  # type: ignore[attr-defined]
        made.append(worker)
        return worker

    yield start
    for worker in made:
        worker.kill()
        assert not worker.alive(), f"{worker.name} outlived its test"


def boot(worker: Worker, role: str, **extra: object) -> str:
    config = {"deadlines": [20.0, 20.0, 20.0], **BEAT, **extra}
    return str(worker.call("start", worker.model, role, **config))  # type: ignore[attr-defined]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def receive(decode: Worker, addr: str, rooms: list[int], prefix: int = 0) -> None:
    """Decode opens rooms 0..n with its blocks (after ``prefix`` blocks of local hit)."""
    jobs = [(f"d-{room}", room, [addr], dst(k)[prefix:], prefix * 16) for k, room in enumerate(rooms)]
    decode.call("submit", recvs=jobs)


def send(prefill: Worker, rooms: list[int]) -> None:
    prefill.call("submit", sends=[(f"p-{room}", room, SRC) for room in rooms])


def assert_nothing_held(prefill: Worker | None, decode: Worker | None, rooms: list[int]) -> None:
    if prefill is not None:
        assert prefill.call("held", [f"p-{r}" for r in rooms], rooms) == []
    if decode is not None:
        assert decode.call("held", [f"d-{r}" for r in rooms], rooms) == []


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC"])
def test_rooms_move_prefills_blocks_into_decodes_blocks(spawn: Callable[[str], Worker], layout: str) -> None:
    prefill, decode = spawn("prefill"), spawn("decode")
    addr = boot(prefill, "kv_producer", layout=layout)
    boot(decode, "kv_consumer", layout=layout)
    rooms = [1, 2, 3]
    receive(decode, addr, rooms)
    send(prefill, rooms)
    got_p = prefill.call("wait", [f"p-{r}" for r in rooms], "sending", 30)
    got_d = decode.call("wait", [f"d-{r}" for r in rooms], "recving", 30)
    assert got_p["sending"] == [f"p-{r}" for r in rooms]
    assert got_d["recving"] == [f"d-{r}" for r in rooms] and got_d["failed"] == got_d["errors"] == []
    for k in range(len(rooms)):
        assert decode.call("holds", dst(k), SRC)
    assert prefill.call("failures") == decode.call("failures") == {}
    assert_nothing_held(prefill, decode, rooms)


def test_decode_killed_mid_transfer_frees_prefills_blocks(spawn: Callable[..., Worker]) -> None:
    # UCX over TCP: a WRITE needs its target's progress, so a stopped decode usually holds the WRITEs
    # in flight (on one-sided transports they finish, and one-rank rooms commit at DONE, protocol 8)
    tcp = {"UCX_TLS": "tcp"}
    prefill, decode = spawn("prefill", tcp), spawn("decode", tcp)
    addr = boot(prefill, "kv_producer")
    boot(decode, "kv_consumer")
    rooms = [1, 2]
    receive(decode, addr, rooms)  # decode's page lists wait on prefill for the rooms
    for room in rooms:
        assert decode.call("wait_state", f"d-{room}", "WaitingForInput", 30) == "WaitingForInput"
    decode.pause()  # the WRITEs go out (pushed as the rooms open); none can finish or commit
    send(prefill, rooms)
    for room in rooms:
        assert prefill.call("wait_state", f"p-{room}", "Transferring", 30) == "Transferring"
    decode.kill()
    got = prefill.call("wait", [f"p-{r}" for r in rooms], "sending", 30)
    assert got["sending"] == [f"p-{r}" for r in rooms]  # blocks given back to vLLM
    # each room has one verdict: Failed with its peer, or Success if its last WRITE was DONE (its
    # bytes in decode's memory) before the kill, which UCX over TCP sometimes manages
    ended, failures = prefill.call("ended"), prefill.call("failures")
    assert sum(ended.values()) == len(rooms) and set(ended) <= {"Success", "Failed"}, ended
    assert sum(failures.values()) == ended.get("Failed", 0), (ended, failures)
    assert set(failures) <= {"PeerLostError", "BackendError", "RemoteFailureError"}, failures
    assert_nothing_held(prefill, None, rooms)
    # the same prefill serves a new decode afterwards
    decode2 = spawn("decode-2", tcp)
    boot(decode2, "kv_consumer")
    receive(decode2, addr, [9])
    send(prefill, [9])
    assert decode2.call("wait", ["d-9"], "recving", 30)["failed"] == []
    assert decode2.call("holds", dst(0), SRC)
    assert prefill.call("wait", ["p-9"], "sending", 30)["sending"][-1] == "p-9"
    assert_nothing_held(prefill, decode2, [9])


def test_prefill_killed_fails_decodes_receives(spawn: Callable[[str], Worker]) -> None:
    prefill, decode = spawn("prefill"), spawn("decode")
    addr = boot(prefill, "kv_producer")
    boot(decode, "kv_consumer")
    rooms = [1, 2]
    receive(decode, addr, rooms)
    prefill.kill()
    got = decode.call("wait", [f"d-{r}" for r in rooms], "recving", 30)
    assert got["recving"] == got["failed"] == [f"d-{r}" for r in rooms]
    assert got["errors"] == sorted(dst(0) + dst(1))  # vLLM's load errors name exactly their blocks
    assert decode.call("failures") == {"PeerLostError": 2}
    assert_nothing_held(None, decode, rooms)


def test_decode_abort_after_registration_waits_for_prefill_and_nothing_lands(
    spawn: Callable[[str], Worker],
) -> None:
    prefill, decode = spawn("prefill"), spawn("decode")
    addr = boot(prefill, "kv_producer", deadlines=[2.0, 2.0, 2.0])
    boot(decode, "kv_consumer")
    receive(decode, addr, [1])
    decode.call("submit", cancels=["d-1"])  # the vLLM request was aborted while its room is open
    got = decode.call("wait", ["d-1"], "recving", 30)
    assert got["recving"] == ["d-1"] and got["failed"] == []  # an abort is not a load error
    assert decode.call("failures") == {"RoomAbortedError": 1}
    # prefill's request finishes only now: its room must not WRITE into the given-back blocks
    send(prefill, [1])
    assert prefill.call("wait", ["p-1"], "sending", 30)["sending"] == ["p-1"]
    assert sum(prefill.call("failures").values()) == 1
    assert decode.call("zero", dst(0))
    assert_nothing_held(prefill, decode, [1])


def test_write_that_fails_to_start_fails_the_room_on_both_sides(spawn: Callable[[str], Worker]) -> None:
    prefill, decode = spawn("prefill"), spawn("decode")
    addr = boot(prefill, "kv_producer")
    boot(decode, "kv_consumer")
    receive(decode, addr, [1])
    prefill.call("break_next_write")
    send(prefill, [1])
    assert prefill.call("wait", ["p-1"], "sending", 30)["sending"] == ["p-1"]
    assert prefill.call("failures") == {"BackendError": 1}
    got = decode.call("wait", ["d-1"], "recving", 30)
    assert got["failed"] == ["d-1"] and got["errors"] == dst(0)  # decode is told, not left waiting
    assert decode.call("failures") == {"RemoteFailureError": 1}
    assert_nothing_held(prefill, decode, [1])
    receive(decode, addr, [2])  # the pair still works
    send(prefill, [2])
    assert decode.call("wait", ["d-2"], "recving", 30)["failed"] == ["d-1"]
    assert decode.call("holds", dst(0), SRC)


def test_partial_prefix_hit_writes_only_the_blocks_after_it(spawn: Callable[[str], Worker]) -> None:
    prefill, decode = spawn("prefill"), spawn("decode")
    addr = boot(prefill, "kv_producer")
    boot(decode, "kv_consumer")
    receive(decode, addr, [1], prefix=2)  # decode holds the first 2 blocks locally
    send(prefill, [1])
    assert decode.call("wait", ["d-1"], "recving", 30)["failed"] == []
    assert prefill.call("wait", ["p-1"], "sending", 30)["sending"] == ["p-1"]
    assert decode.call("holds", dst(0)[2:], SRC[2:])  # prefill's third block into decode's
    assert decode.call("zero", dst(0)[:2])  # the prefix blocks were not written
    assert_nothing_held(prefill, decode, [1])


def test_prefill_replaced_under_the_same_address(spawn: Callable[[str], Worker]) -> None:
    port = free_port()
    old, decode = spawn("prefill"), spawn("decode")
    addr = boot(old, "kv_producer", bootstrap_port=port)
    boot(decode, "kv_consumer")
    receive(decode, addr, [1])
    send(old, [1])
    assert decode.call("wait", ["d-1"], "recving", 30)["failed"] == []
    receive(decode, addr, [2])  # open when the old instance goes away
    old.kill()
    new = spawn("prefill-new")
    assert boot(new, "kv_producer", bootstrap_port=port) == addr
    got = decode.call("wait", ["d-2"], "recving", 30)
    assert got["failed"] == ["d-2"]  # the room of the dead instance failed; nothing deadlocked
    receive(decode, addr, [3])  # the new instance under the same address serves new rooms
    send(new, [3])
    got = decode.call("wait", ["d-3"], "recving", 30)
    assert got["failed"] == ["d-2"]
    assert decode.call("holds", dst(0), SRC)
    assert new.call("wait", ["p-3"], "sending", 30)["sending"] == ["p-3"]
    assert_nothing_held(new, decode, [3])
    assert_nothing_held(None, decode, [1, 2])


@pytest.mark.parametrize("mode", ["auto", "direct"])
def test_decode_tensor_parallel_two_ranks_each_receive_their_heads(
    spawn: Callable[[str], Worker], mode: str
) -> None:
    prefill = spawn("prefill")
    ranks = [spawn("decode-0"), spawn("decode-1")]
    addr = boot(prefill, "kv_producer", transfer_mode=mode)  # TP 1: both heads
    # "auto" stages (head slices interleave within a token row), "direct" writes row by row
    staging = {"staging_pages": 16} if mode == "auto" else {}
    for r, rank in enumerate(ranks):
        boot(rank, "kv_consumer", kv_heads=1, tp_rank=r, tp_size=2, transfer_mode=mode, **staging)
    for rank in ranks:  # both decode ranks register the same blocks of their own caches
        receive(rank, addr, [1])
    send(prefill, [1])
    assert prefill.call("wait", ["p-1"], "sending", 30)["sending"] == ["p-1"]
    for rank in ranks:
        assert rank.call("wait", ["d-1"], "recving", 30)["failed"] == []
        assert rank.call("holds_heads", dst(0), SRC, 2)
        assert_nothing_held(None, rank, [1])
    assert_nothing_held(prefill, None, [1])
