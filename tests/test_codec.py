"""Control-plane frames: round trips, every rejection, and fuzzing."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvroom.errors import ProtocolError
from kvroom.transport.codec import MAGIC, decode, encode

CAP = 1 << 20


def _room(**overrides: object) -> bytes:
    header = {"type": "room", "room": 1, "aux_index": None, "prefix_pages": 0, "npages": 1}
    return json.dumps({**header, "staging": None, "chunk_pages": 16, **overrides}).encode()


def test_round_trip() -> None:
    fields = {"room": 7, "aux_index": None, "prefix_pages": 0, "npages": 2, "staging": [0], "chunk_pages": 16}
    frames = encode("room", fields, b"\0" * 16)
    msg = decode(frames, CAP)
    assert msg.type == "room" and msg.fields["room"] == 7 and msg.payload == b"\0" * 16
    assert decode(encode("ping"), CAP).type == "ping"


def test_written_carries_the_notifications_of_done_writes() -> None:
    payload = b"kvr2:7:0:0:16:0;kvr2:9:2:32:8:1"
    msg = decode(encode("written", payload=payload), CAP)
    assert msg.type == "written" and msg.fields == {} and msg.payload == payload
    with pytest.raises(ProtocolError, match="not a list of WRITE notifications"):
        encode("written", payload=b"")


def test_an_abort_may_name_the_request_it_is_for() -> None:
    plain = decode(encode("abort", {"room": 3, "reason": "x"}), CAP)
    assert plain.fields == {"room": 3, "reason": "x", "fingerprint": None}
    scoped = decode(encode("abort", {"room": 3, "reason": "x", "fingerprint": "3:ab"}), CAP)
    assert scoped.fields["fingerprint"] == "3:ab"


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([MAGIC], "expected 2 or 3 frames"),
        ([b"HTTP", b"{}"], "bad magic"),
        ([b"KVR\x09", b'{"type":"ping"}'], "unsupported protocol version 9"),
        ([MAGIC, b"{not json"], "not JSON"),
        ([MAGIC, b"[1,2]"], "no message type"),
        ([MAGIC, b'{"type":"launch"}'], "unknown message type"),
        ([MAGIC, b'{"type":"abort","room":1}'], "missing field 'reason'"),
        ([MAGIC, b'{"type":"abort","room":"1","reason":"x"}'], "field 'room' has type str"),
        ([MAGIC, b'{"type":"abort","room":true,"reason":"x"}'], "field 'room' has type bool"),
        ([MAGIC, b'{"type":"abort","room":-1,"reason":"x"}'], "out of range"),
        ([MAGIC, b'{"type":"abort","room":1,"reason":"x","fingerprint":7}'], "'fingerprint' has type int"),
        ([MAGIC, b'{"type":"abort","room":1,"reason":"x","fingerprint":""}'], "abort: fingerprint of 0"),
        ([MAGIC, _room(fingerprint="f" * 129), b"\0" * 8], "room: fingerprint of 129"),
        ([MAGIC, b'{"type":"ping","extra":1}'], "unexpected fields"),
        ([MAGIC, b'{"type":"ping"}', b"payload"], "wrong number of frames"),
        (
            [MAGIC, _room(npages=3), b"\0" * 8],
            "payload of 8",
        ),
        ([MAGIC, _room(staging=[0, 1]), b"\0" * 8], "2 staging chunks for 1 pages"),
        ([MAGIC, _room(staging=[-1]), b"\0" * 8], "staging offsets must be non-negative"),
        ([MAGIC, _room(staging=[True]), b"\0" * 8], "staging offsets must be non-negative"),
        ([MAGIC, _room(staging=[0], chunk_pages=0), b"\0" * 8], "staging chunks"),
        (
            [MAGIC, _room(staging="x"), b"\0" * 8],
            "field 'staging' has type str",
        ),
        ([MAGIC, b'{"type":"ping"}', b"x" * CAP], "exceeds"),
        ([MAGIC, b'{"type":"written"}', b"kvr2:1:0:0:4"], "not a list of WRITE notifications"),
        ([MAGIC, b'{"type":"written"}', b"kvr2:1:0:0:4:1;"], "not a list of WRITE notifications"),
        ([MAGIC, b'{"type":"written"}'], "wrong number of frames"),
    ],
)
def test_bad_frames_are_rejected_with_a_reason(frames: list[bytes], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode(frames, CAP)


def test_oversized_header_is_rejected() -> None:
    header = json.dumps({"type": "abort", "room": 1, "reason": "x" * 70000}).encode()
    with pytest.raises(ProtocolError, match="header of"):
        decode([MAGIC, header], CAP)


def test_encode_refuses_what_decode_would_refuse() -> None:
    with pytest.raises(ValueError, match="unknown message type"):
        encode("launch")
    with pytest.raises(ProtocolError, match="missing field"):
        encode("abort", {"room": 1})


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=0, max_size=4))
def test_arbitrary_bytes_never_escape_as_anything_but_protocol_error(frames: list[bytes]) -> None:
    with contextlib.suppress(ProtocolError):  # anything else fails the test
        decode(frames, CAP)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["type", "room", "reason", "npages", "aux_index", "prefix_pages", "agent", "x"]),
        st.one_of(
            st.none(), st.booleans(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2)
        ),
    ),
    st.binary(max_size=64),
)
def test_structured_garbage_is_rejected_or_valid(header: dict[str, object], payload: bytes) -> None:
    frames = [MAGIC, json.dumps(header).encode(), payload]
    try:
        msg = decode(frames, CAP)
    except ProtocolError:
        return
    assert msg.type in ("room", "hello", "welcome")  # only payload-carrying types accept 3 frames
