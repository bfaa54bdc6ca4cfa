"""Prefill TP 2 -> decode TP 1 through SGLang's calls: two prefill rank processes (one gloo group,
rank 0 serving SGLang's bootstrap server), each sending its KV heads; decode reassembles them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("sglang")

from tests.integrations.sglang.cluster import Cluster, call_all
from tests.integrations.sglang.node import PAGE_SIZE, TERMINAL

pytestmark = pytest.mark.slow


@pytest.fixture(params=["direct", "staged"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    staging = {"KVROOM_STAGING_PAGES": "32"} if request.param == "staged" else {}
    cluster = Cluster(prefill_tp=2, decode_tps=(1,), env=staging)
    try:
        yield cluster
    finally:
        cluster.close()


def test_prefill_tp2_to_decode_tp1_reassembles_every_head(cluster: Cluster) -> None:
    prefill, decode, addr = cluster.prefill, cluster.decodes[0][0], cluster.addr
    requests = {11: ([1, 2, 3], [30, 31, 32], 0), 12: ([4, 5, 6, 7, 8], [20, 21, 22, 23, 24], 1)}
    for room, (_, dst, aux) in requests.items():
        decode.call("receiver", room, addr, dst, aux, 0)
        for node in prefill:
            node.call("sender", room)
    rooms = list(requests)
    assert (
        call_all(prefill, "wait", rooms, ["WaitingForInput"], 30)
        == [dict.fromkeys(rooms, "WaitingForInput")] * 2
    )
    for room, (src, _, aux) in requests.items():
        for node in prefill:
            node.call("begin", room, len(src) * PAGE_SIZE, aux)
            node.call("chunk", room, src[:2], False)
            node.call("chunk", room, src[2:], True)
    assert call_all(prefill, "wait", rooms, list(TERMINAL), 30) == [dict.fromkeys(rooms, "Success")] * 2
    assert decode.call("wait", rooms, list(TERMINAL), 30) == dict.fromkeys(rooms, "Success")
    for room, (src, dst, aux) in requests.items():
        assert decode.call("holds", dst, src)
        assert decode.call("aux", aux) == (room, room % 1000 + 1)
        for node in [*prefill, decode]:
            node.call("clear", room)
            assert node.call("footprint", room) == []
