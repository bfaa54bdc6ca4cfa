"""The authenticated control plane (kvroom/transport/auth.py): CURVE keys, refusals, room binding.

One keyed prefill serves two keyed decode processes' managers, A and B (each
with its own key, both trusted).  A *bystander* room of A's sits mid-transfer
through every test: nothing an unauthenticated, wrongly keyed or foreign
(B's) client sends may change it, and it still completes afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from kvroom import (
    CurveKeys,
    IncompatiblePeerError,
    KVManager,
    KVPoll,
    KVReceiver,
    KVSender,
    ManagerConfig,
    PeerLostError,
)
from kvroom.cli import main as kvroom_main
from kvroom.transport.auth import AUTH_ENV, auth_settings, generate_keys, is_loopback
from kvroom.transport.codec import MAGIC, encode
from tests.test_api import FAST, make_pool, ready_pair, wait

P_PUB, P_SEC = zmq.curve_keypair()
A_PUB, A_SEC = zmq.curve_keypair()
B_PUB, B_SEC = zmq.curve_keypair()
X_PUB, X_SEC = zmq.curve_keypair()  # trusted by nobody

PREFILL_KEYS = CurveKeys(P_PUB, P_SEC, frozenset({A_PUB, B_PUB}))


def decode_keys(public: bytes, secret: bytes) -> CurveKeys:
    return CurveKeys(public, secret, frozenset({P_PUB}))


def keyed(keys: CurveKeys) -> ManagerConfig:
    return dataclasses.replace(FAST, keys=keys)


class Managers:
    """A keyed prefill, decode A (owns the bystander room 100) and decode B."""

    def __init__(self) -> None:
        self.p = KVManager("prefill", make_pool(), config=keyed(PREFILL_KEYS), audit=False)
        self.a = KVManager("decode", make_pool(), config=keyed(decode_keys(A_PUB, A_SEC)), audit=False)
        self.b = KVManager("decode", make_pool(), config=keyed(decode_keys(B_PUB, B_SEC)), audit=False)
        tx, rx = ready_pair(self.p, self.b, 1, pages=2)  # B completes its handshake
        tx.send([0, 1])
        assert wait(lambda: rx.poll() is KVPoll.Success and tx.poll() is KVPoll.Success)
        tx.clear()
        rx.clear()

    def close(self) -> None:
        for m in (self.p, self.a, self.b):
            m.close()


@pytest.fixture(scope="module")
def managers() -> Iterator[Managers]:
    m = Managers()
    yield m
    m.close()


class Bystander:
    """A's room mid-transfer that nothing here may touch."""

    def __init__(self, m: Managers, room: int = 100) -> None:
        self.m, self.room = m, room
        self.tx, self.rx = ready_pair(m.p, m.a, room, pages=4)
        self.tx.send([0, 1])
        assert wait(lambda: self.rx.poll() is KVPoll.Transferring)
        self.before = self.state()

    def state(self) -> tuple[object, ...]:
        m = self.m
        return (self.tx.room.state, self.rx.room.state, m.p.footprint(self.room), m.a.footprint(self.room))

    def check(self) -> None:
        assert self.state() == self.before, "another client changed A's room"
        self.tx.send([2, 3])
        assert wait(lambda: self.rx.poll() is KVPoll.Success and self.tx.poll() is KVPoll.Success)
        self.tx.clear()
        self.rx.clear()


@pytest.fixture
def env(managers: Managers) -> Iterator[Managers]:
    bystander = Bystander(managers)
    yield managers
    bystander.check()


def dealer(
    address: str, public: bytes | None = None, secret: bytes | None = None, server: bytes = P_PUB
) -> Any:
    """A raw DEALER: plain text without keys, else a CURVE client expecting ``server``."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if public is not None and secret is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server
    sock.connect(f"tcp://{address}")
    return sock


def hello(agent: str) -> list[bytes]:
    rank: dict[str, Any] = {"layout": {}, "pool": {}}
    return encode("hello", {"agent": agent, "rank": rank, "staging_base": 0, "staging_bytes": 0}, b"md")


ROOM_FIELDS = {"aux_index": None, "prefix_pages": 0, "npages": 1, "staging": None, "chunk_pages": 16}


# -- keys and the refusal to listen unauthenticated ----------------------------------------


def test_kvroom_keys_writes_a_0600_pair_that_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert kvroom_main(["keys", str(tmp_path), "--name", "prefill"]) == 0
    assert "prefill.key_secret" in capsys.readouterr().out
    generate_keys(tmp_path, "decode")
    for name in ("prefill.key", "prefill.key_secret", "decode.key", "decode.key_secret"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name
    keys = CurveKeys.load(tmp_path / "prefill.key_secret", [tmp_path / "decode.key"])
    assert keys.trusted == frozenset({CurveKeys.load(tmp_path / "decode.key_secret", tmp_path).public})
    assert kvroom_main(["keys", str(tmp_path), "--name", "prefill"]) == 1  # never overwrites
    with pytest.raises(ValueError, match="holds no secret key"):
        CurveKeys.load(tmp_path / "prefill.key", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \*\.key public key files"):
        CurveKeys.load(tmp_path / "prefill.key_secret", tmp_path / "empty")
    with pytest.raises(ValueError, match="cannot read CURVE key file"):
        CurveKeys.load(tmp_path / "prefill.key_secret", tmp_path / "missing.key")
    assert P_SEC.decode() not in repr(PREFILL_KEYS)  # a config printed in a log shows no secret
    assert hash(keyed(PREFILL_KEYS)) == hash(keyed(dataclasses.replace(PREFILL_KEYS)))
    with pytest.raises(ValueError, match="does not belong"):
        CurveKeys(P_PUB, A_SEC, frozenset({A_PUB}))
    with pytest.raises(ValueError, match="none is named for"):
        CurveKeys(A_PUB, A_SEC, frozenset({P_PUB, B_PUB})).server_key("10.0.0.1:5000")


def test_listening_beyond_loopback_needs_keys_or_a_loud_opt_out() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("node7")
    with pytest.raises(
        ValueError, match=r"refusing to listen on 0\.0\.0\.0 without authentication.*kvroom keys"
    ):
        KVManager("prefill", make_pool(), config=dataclasses.replace(FAST, host="0.0.0.0"), audit=False)
    opted = dataclasses.replace(FAST, host="0.0.0.0", allow_unauthenticated=True)
    with capture_logs() as logs, KVManager("prefill", make_pool(), config=opted, audit=False) as p:
        assert p.snapshot()["auth"] == "none"
    assert [e["host"] for e in logs if e["event"] == "kvroom.unauthenticated_control_plane"] == ["0.0.0.0"]
    assert all(
        e["log_level"] == "warning" for e in logs if e["event"].endswith("unauthenticated_control_plane")
    )
    with KVManager("decode", make_pool(), config=dataclasses.replace(FAST, host="0.0.0.0"), audit=False):
        pass  # decode listens nowhere: nothing to refuse


def test_engine_adapters_settings_become_keys_or_an_explicit_opt_out(tmp_path: Path) -> None:
    # what the SGLang and vLLM adapters pass through (environment / kv_connector_extra_config)
    generate_keys(tmp_path / "prefill", "prefill")
    generate_keys(tmp_path / "decode", "decode")
    got = auth_settings(
        {
            "key_file": str(tmp_path / "prefill" / "prefill.key_secret"),
            "trusted_keys": str(tmp_path / "decode"),
        }
    )
    decode_key = CurveKeys.load(tmp_path / "decode" / "decode.key_secret", tmp_path / "prefill").public
    assert set(got) == {"keys"} and got["keys"].trusted == frozenset({decode_key})
    assert auth_settings({}) == {} and auth_settings(dict.fromkeys(AUTH_ENV)) == {}
    assert auth_settings({"allow_unauthenticated": "1"}) == {"allow_unauthenticated": True}
    assert auth_settings({"allow_unauthenticated": False}) == {"allow_unauthenticated": False}
    assert auth_settings({"allow_unauthenticated": "off"}) == {"allow_unauthenticated": False}
    with pytest.raises(ValueError, match="must be true or false, got 'maybe'"):
        auth_settings({"allow_unauthenticated": "maybe"})
    with pytest.raises(ValueError, match="needs both key_file"):
        auth_settings({"key_file": str(tmp_path / "prefill" / "prefill.key_secret")})
    with pytest.raises(ValueError, match="cannot read CURVE key file"):
        auth_settings(
            {"key_file": str(tmp_path / "nope.key_secret"), "trusted_keys": str(tmp_path / "decode")}
        )
    keyed_config = dataclasses.replace(FAST, host="0.0.0.0", **got)
    with KVManager("prefill", make_pool(), config=keyed_config, audit=False) as p:
        assert p.snapshot()["auth"] != "none"


# -- who gets in ----------------------------------------------------------------------------


def test_unauthenticated_or_wrongly_keyed_clients_get_nothing_and_create_nothing(env: Managers) -> None:
    p = env.p
    before = p.snapshot()
    rooms = set(p.table._rooms)
    socks = [
        dealer(p.bootstrap_addr),  # plain text
        dealer(p.bootstrap_addr, X_PUB, X_SEC),  # a key nobody trusts
        dealer(p.bootstrap_addr, A_PUB, A_SEC, server=X_PUB),  # a trusted key, but another server's
    ]
    try:
        for sock in socks:
            sock.send_multipart(hello(env.a.agent_name))
            sock.send_multipart(encode("room", {"room": 555, **ROOM_FIELDS}, b"\0" * 8))
            for kind in ("abort", "ready", "commit"):
                fields = {"room": 100, "reason": "forged"} if kind == "abort" else {"room": 100}
                sock.send_multipart(encode(kind, fields))
        assert wait(lambda: p.snapshot()["refused_handshakes"] >= before["refused_handshakes"] + 3)
        assert p.snapshot()["unknown_keys"] >= before["unknown_keys"] + 1
        time.sleep(0.2)
        for sock in socks:
            assert sock.poll(0) == 0, "an unauthenticated client got an answer (metadata?)"
        after = p.snapshot()
        assert set(p.table._rooms) <= rooms and after["pending_infos"] == 0
        assert after["peers"] == before["peers"]
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize(
    ("keys", "error", "reason"),
    [
        pytest.param(
            decode_keys(X_PUB, X_SEC), IncompatiblePeerError, "refused our CURVE key", id="untrusted"
        ),
        pytest.param(
            CurveKeys(A_PUB, A_SEC, frozenset({X_PUB})),
            PeerLostError,
            "refused our key",
            id="other-server-key",
        ),
    ],
)
def test_a_decode_with_a_wrong_key_fails_its_room_and_learns_nothing(
    env: Managers, keys: CurveKeys, error: type[Exception], reason: str
) -> None:
    with KVManager("decode", make_pool(), config=keyed(keys), audit=False) as x:
        rx = KVReceiver(x, env.p.bootstrap_addr, 4242)
        rx.init()
        rx.send_metadata([0])
        assert wait(lambda: rx.poll() is KVPoll.Failed, timeout=FAST.heartbeat_timeout + 3)
        with pytest.raises(error, match=reason):
            rx.failure_exception()
        assert not x.side.by_agent  # no prefill metadata reached it
    assert env.p.table.get(4242) is None and env.p.snapshot()["pending_infos"] == 0


# -- a peer acts only on its own rooms -------------------------------------------------------


def test_an_authenticated_peer_cannot_abort_complete_or_redirect_another_peers_room(env: Managers) -> None:
    p, b = env.p, env.b
    peer = b.side.peers[p.bootstrap_addr]
    foreign = p.snapshot()["foreign_room_messages"]

    def forge() -> None:
        peer.client.send("abort", {"room": 100, "reason": "forged by B"})
        peer.client.send("ready", {"room": 100})
        peer.client.send("commit", {"room": 100})
        peer.client.send("room", {"room": 100, **ROOM_FIELDS}, (5).to_bytes(8, "little"))

    with capture_logs() as logs:
        b.submit(forge)
        assert wait(lambda: p.snapshot()["foreign_room_messages"] >= foreign + 4)
    seen = {e["message"] for e in logs if e["event"] == "kvroom.foreign_room_message" and e["room"] == 100}
    assert seen == {"abort", "ready", "commit", "room"}
    assert p.side.by_agent[b.agent_name].principal == B_PUB.decode()


def test_an_agent_name_is_no_credential(env: Managers) -> None:
    """B greeting prefill under A's agent name is refused; A keeps its peer and its rooms."""
    sock = dealer(env.p.bootstrap_addr, B_PUB, B_SEC)
    try:
        sock.send_multipart(hello(env.a.agent_name))
        assert sock.poll(5000)
        reply = sock.recv_multipart()
        assert b'"type":"reject"' in reply[1] and b"belongs to another peer" in reply[1]
        assert env.p.side.by_agent[env.a.agent_name].principal == A_PUB.decode()
    finally:
        sock.close()


def test_an_abort_of_a_room_no_one_bound_yet_holds_only_against_its_sender(env: Managers) -> None:
    p, a, b = env.p, env.a, env.b
    tx = KVSender(p, p.bootstrap_addr, 300)  # prefill's room exists; no page list yet
    peer = b.side.peers[p.bootstrap_addr]
    b.submit(lambda: peer.client.send("abort", {"room": 300, "reason": "guessed"}))
    assert wait(lambda: p.side.tombstones.get(300) is not None)
    assert tx.poll() is KVPoll.Bootstrapping
    rx = KVReceiver(a, p.bootstrap_addr, 300)  # the owner binds it and is served
    rx.init()
    rx.send_metadata([20, 21], aux_index=None)
    assert wait(lambda: tx.poll() is KVPoll.WaitingForInput)
    tx.init(2)
    tx.send([0, 1])
    assert wait(lambda: rx.poll() is KVPoll.Success and tx.poll() is KVPoll.Success)
    tx.clear()
    rx.clear()


# -- fuzzing as an authenticated peer --------------------------------------------------------

_kinds = st.sampled_from(["abort", "ready", "commit", "room", "ping"])
_room_ids = st.sampled_from([100, 1, 0, 2**63]) | st.integers(0, 2**64 - 1)


@st.composite
def _message(draw: st.DrawFn) -> list[bytes]:
    if draw(st.booleans()):
        return draw(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
    kind, room = draw(_kinds), draw(_room_ids)
    if kind == "room":
        n = draw(st.integers(0, 3))
        pages = b"".join(draw(st.integers(-5, 70)).to_bytes(8, "little", signed=True) for _ in range(n))
        return encode("room", {"room": room, **ROOM_FIELDS, "npages": n}, pages)
    if kind == "ping":
        return encode(kind)
    fields: dict[str, Any] = {"room": room}
    if kind == "abort":
        fields["reason"] = draw(st.text(max_size=20))
    return [MAGIC, *encode(kind, fields)[1:]]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_message(), min_size=1, max_size=6))
def test_a_fuzzed_authenticated_peer_cannot_crash_the_manager_or_touch_a_room(
    env: Managers, batch: list[list[bytes]]
) -> None:
    """B, handshaken and authenticated, sends garbage and well-formed messages about any room."""
    p, b = env.p, env.b
    rooms = set(p.table._rooms)
    peer = b.side.peers[p.bootstrap_addr]
    sent = []

    def fuzz() -> None:
        for frames in batch:
            peer.client.socket.send_multipart(frames)
        peer.client.send("ping")
        sent.append(True)

    b.submit(fuzz)
    assert wait(lambda: bool(sent))
    time.sleep(0.02)
    p.check_alive()
    b.check_alive()
    assert set(p.table._rooms) <= rooms
