"""The case kvroom was started for, through SGLang's calls: a decode process killed mid-transfer.

The prefill scheduler's loop keeps running (no call raises), ``failure_exception()``
raises SGLang's ``KVTransferError`` carrying the disconnect, every per-room store of the
dead decode's rooms is empty on prefill, and the rooms of another decode are untouched.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("sglang")

from tests.integrations.sglang.cluster import Cluster, Node
from tests.integrations.sglang.node import PAGE_SIZE, TERMINAL

pytestmark = pytest.mark.slow

HEARTBEAT_TIMEOUT = 3.0
SRC = list(range(1, 9))


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    env = {"KVROOM_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT), "KVROOM_HEARTBEAT_INTERVAL": "0.5"}
    cluster = Cluster(decode_tps=(1, 1), env=env)
    try:
        yield cluster
    finally:
        cluster.close()


def open_mid_transfer(prefill: Node, decode: Node, addr: str, room: int, dst: list[int], aux: int) -> None:
    """A room whose first chunk was sent: mid-transfer."""
    decode.call("receiver", room, addr, dst, aux, 0)
    prefill.call("sender", room)
    assert prefill.call("wait", [room], ["WaitingForInput"], 30) == {room: "WaitingForInput"}
    prefill.call("begin", room, len(SRC) * PAGE_SIZE, aux)
    prefill.call("chunk", room, SRC[:3], False)


def test_a_decode_killed_mid_transfer_fails_only_its_rooms_and_leaves_nothing(cluster: Cluster) -> None:
    prefill, dead, alive, addr = (
        cluster.prefill[0],
        cluster.decodes[0][0],
        cluster.decodes[1][0],
        cluster.addr,
    )
    dst = list(range(10, 18))
    doomed, bystander = [1, 2], 3
    for k, room in enumerate(doomed):
        open_mid_transfer(prefill, dead, addr, room, [p + 8 * k for p in dst], aux=k)
    open_mid_transfer(prefill, alive, addr, bystander, dst, aux=2)
    dead.kill()
    for room in [*doomed, bystander]:
        prefill.call("chunk", room, SRC[3:], True)  # the scheduler's loop goes on: nothing raises
    got = prefill.call("wait", [*doomed, bystander], list(TERMINAL), HEARTBEAT_TIMEOUT + 30)
    assert got == {1: "Failed", 2: "Failed", 3: "Success"}
    for room in doomed:
        assert prefill.call("footprint", room) == []  # cleared before the exception is raised
        failure = prefill.call("failure", room)
        assert failure["type"] == "KVTransferError" and not failure["another_rank"], failure
        assert failure["cause"] == "PeerLostError", failure
        prefill.call("clear", room, times=2)
    assert alive.call("wait", [bystander], list(TERMINAL), 30) == {bystander: "Success"}
    assert alive.call("holds", dst, SRC)
    assert alive.call("aux", 2) == (bystander, bystander % 1000 + 1)
    for node in (prefill, alive):
        node.call("clear", bystander)
        assert node.call("footprint", bystander) == []
    assert prefill.call("live_rooms") == 0
    # and the same prefill serves the surviving decode afterwards
    open_mid_transfer(prefill, alive, addr, 4, dst, aux=3)
    prefill.call("chunk", 4, SRC[3:], True)
    assert prefill.call("wait", [4], list(TERMINAL), 30) == {4: "Success"}
    assert alive.call("wait", [4], list(TERMINAL), 30) == {4: "Success"}
    assert alive.call("holds", dst, SRC)


def test_a_prefill_killed_mid_transfer_fails_decode_rooms_by_the_heartbeat_with_pages_free(
    cluster: Cluster,
) -> None:
    prefill, decode, addr = cluster.prefill[0], cluster.decodes[0][0], cluster.addr
    open_mid_transfer(prefill, decode, addr, 5, list(range(10, 18)), aux=1)
    prefill.kill()
    got = decode.call("wait", [5], list(TERMINAL), HEARTBEAT_TIMEOUT + 30)
    assert got == {5: "Failed"}
    assert decode.call("footprint", 5) == []
    assert decode.call("release_safe", 5)  # no WRITE of the dead prefill can land any more
    failure = decode.call("failure", 5)
    assert failure["type"] == "KVTransferError" and failure["cause"] == "PeerLostError", failure
    decode.call("clear", 5, times=2)
