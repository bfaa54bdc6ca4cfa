"""Signed routes: with kvroom's keys a stranger's ``PUT /route`` changes nothing and fails no room.

A keyed pair (prefill and decode, each with its own CURVE key trusting the
other's) behind kvroom's bootstrap server; the test plays the stranger, with
no proof, with a proof from a key no prefill holds, with a genuine
registration altered, and with an older genuine one replayed.  The sealing and
checking themselves are tested in this process.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("sglang")
pytest.importorskip("nacl")

import requests

from kvroom.integrations.sglang.routes import PROOF, RouteGuard, seal
from kvroom.transport.auth import generate_keys
from tests.integrations.sglang.cluster import Cluster, Node
from tests.integrations.sglang.node import PAGE_SIZE, TERMINAL

ROOMS = itertools.count(6001)


def _keys(directory: Path, name: str) -> tuple[bytes, bytes]:
    import zmq.auth

    generate_keys(directory, name)
    public, secret = zmq.auth.load_certificate(directory / f"{name}.key_secret")
    assert secret is not None
    return bytes(public), bytes(secret)


def route(tp_rank: int = 0, port: int = 1) -> dict[str, Any]:
    """A ``PUT /route`` payload as kvroom's (and SGLang's) prefill ranks send it."""
    return {
        "attn_tp_size": 1, "attn_tp_rank": tp_rank, "attn_cp_size": 1, "attn_cp_rank": 0,
        "attn_dp_size": 1, "attn_dp_rank": 0, "pp_size": 1, "pp_rank": 0, "system_dp_size": 1,
        "system_dp_rank": 0, "rank_ip": "127.0.0.1", "rank_port": port, "page_size": PAGE_SIZE,
        "kv_cache_dtype": "auto", "load_balance_method": "follow_bootstrap_room",
    }  # fmt: skip


def test_a_route_sealed_by_a_trusted_prefill_key_passes_and_nothing_else_does(tmp_path: Path) -> None:
    server_public, server_secret = _keys(tmp_path / "server", "prefill")
    other_public, other_secret = _keys(tmp_path / "other", "other")
    guard = RouteGuard(server_public, server_secret, frozenset())
    assert guard.check(seal(route(), server_secret, server_public, now=10.0)) is None  # its own key
    assert "no kvroom_proof" in (guard.check(route()) or "")
    assert "not sealed with a trusted" in (
        guard.check(seal(route(), other_secret, server_public, now=11.0)) or ""
    )
    altered = {**seal(route(), server_secret, server_public, now=12.0), "rank_port": 666}
    assert "differs" in (guard.check(altered) or "")
    assert "replayed" in (guard.check(seal(route(), server_secret, server_public, now=9.0)) or "")
    assert guard.check(seal(route(tp_rank=1), server_secret, server_public, now=9.0)) is None  # another slot
    assert "not base64" in (guard.check({**route(), PROOF: "%%%"}) or "")
    trusting = RouteGuard(server_public, server_secret, frozenset({other_public}))  # KVROOM_PREFILL_KEYS
    assert trusting.check(seal(route(), other_secret, server_public, now=13.0)) is None


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, Node, str, bytes, bytes]]:
    root = tmp_path_factory.mktemp("keys")
    prefill_public, prefill_secret = _keys(root / "prefill", "prefill")
    _keys(root / "decode", "decode")
    role_env = {
        "prefill": {"KVROOM_KEY_FILE": str(root / "prefill" / "prefill.key_secret"),
                    "KVROOM_TRUSTED_KEYS": str(root / "decode")},
        "decode": {"KVROOM_KEY_FILE": str(root / "decode" / "decode.key_secret"),
                   "KVROOM_TRUSTED_KEYS": str(root / "prefill")},
    }  # fmt: skip
    cluster = Cluster(role_env=role_env)
    try:
        yield cluster.prefill[0], cluster.decodes[0][0], cluster.addr, prefill_public, prefill_secret
    finally:
        cluster.close()


def _registered(addr: str) -> dict[str, Any]:
    query = {"prefill_dp_rank": 0, "prefill_cp_rank": 0, "target_tp_rank": 0, "target_pp_rank": 0}
    response = requests.get(f"http://{addr}/route", params=query, timeout=5)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_a_strangers_put_neither_replaces_the_prefill_nor_fails_a_decode_room(
    keyed: tuple[Node, Node, str, bytes, bytes], tmp_path: Path
) -> None:
    prefill, decode, addr, prefill_public, _ = keyed
    genuine = _registered(addr)
    stranger_public, stranger_secret = _keys(tmp_path, "stranger")
    attempts = [
        route(port=1),  # no proof at all
        seal(route(port=1), stranger_secret, prefill_public),  # a key no prefill holds
        seal(route(port=1), stranger_secret, stranger_public),
    ]
    for payload in attempts:
        response = requests.put(f"http://{addr}/route", json=payload, timeout=5)
        assert response.status_code == 403 and "kvroom refused" in response.text, response.text
    assert _registered(addr) == genuine  # the registered prefill stands
    room = next(ROOMS)  # and a decode room after the attempts is served as before
    decode.call("receiver", room, addr, [40, 41], 4)
    prefill.call("sender", room)
    assert prefill.call("wait", [room], ["WaitingForInput"], 30) == {room: "WaitingForInput"}
    prefill.call("begin", room, 2 * PAGE_SIZE, 4)
    prefill.call("chunk", room, [5, 6], True)
    for node in (prefill, decode):
        assert node.call("wait", [room], list(TERMINAL), 30) == {room: "Success"}
    assert decode.call("holds", [40, 41], [5, 6])
    for node in (prefill, decode):
        node.call("clear", room)


def test_the_prefills_own_sealed_registration_is_taken(keyed: tuple[Node, Node, str, bytes, bytes]) -> None:
    _, _, addr, prefill_public, prefill_secret = keyed
    genuine = _registered(addr)
    payload = seal({**route(), "rank_port": int(genuine["rank_port"])}, prefill_secret, prefill_public)
    response = requests.put(f"http://{addr}/route", json=payload, timeout=5)
    assert response.status_code == 200, response.text
    assert _registered(addr) == genuine
