"""Control-plane frames: versioned, schema-checked, size-capped.

A message is a ZMQ multipart of 2 or 3 frames: ``MAGIC`` (with the protocol
version), a JSON header ``{"type": ..., fields...}``, and for some types one
binary payload.  :func:`decode` validates everything a peer can get wrong and
raises :class:`~kvroom.errors.ProtocolError`; it never creates state.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from kvroom.errors import ProtocolError
from kvroom.transport.notif import parse_notifs

__all__ = ["MAGIC", "VERSION", "Message", "encode", "decode", "SCHEMA", "MAX_HEADER_BYTES"]

VERSION = 8  # 4: hello/welcome carry planning layouts + regions, room state indices; 5: room fingerprint;
# 6: an abort may name the request (fingerprint) it is for; 7: WRITEs are announced by ``written``, not
# by NIXL notifications; 8: a room with one rank on each side commits in its last ``written``
MAGIC = b"KVR" + bytes([VERSION])
MAX_HEADER_BYTES = 64 * 1024
MAX_FINGERPRINT = 128  # characters of a room message's request fingerprint

_INT = (int,)
_OPT_INT = (int, type(None))
_STR = (str,)
_OPT_STR = (str, type(None))
_DICT = (dict,)
_OPT_LIST = (list, type(None))
_OPT_DICT = (dict, type(None))

# type -> (required fields with their types, payload: "none" | "required")
SCHEMA: dict[str, tuple[dict[str, tuple[type, ...]], str]] = {
    # rank: RankRegions.to_dict() (decode) / RankLayout.to_dict() (prefill); staging: the decode ring
    "hello": ({"agent": _STR, "rank": _DICT, "staging_base": _INT, "staging_bytes": _INT}, "required"),
    "welcome": ({"agent": _STR, "rank": _DICT}, "required"),
    "reject": ({"reason": _STR}, "none"),
    # staging: None, or the staging-ring unit offset of each chunk of chunk_pages pages
    "room": (
        {
            "room": _INT,
            "aux_index": _OPT_INT,
            "prefix_pages": _INT,
            "npages": _INT,
            "staging": _OPT_LIST,
            "chunk_pages": _INT,
            "state": _OPT_DICT,  # index space -> this rank's state rows / sliding-window pages
            "fingerprint": _OPT_STR,  # the request decode expects (kvroom.request_fingerprint), or None
        },
        "required",
    ),
    # fingerprint: None, or the one request this abort is for (decode holds no room for it: no answer)
    "abort": ({"room": _INT, "reason": _STR, "fingerprint": _OPT_STR}, "none"),
    "failed": ({"room": _INT, "reason": _STR}, "none"),
    # prefill -> decode: these WRITEs are DONE (payload: their notifications, kvroom.transport.notif)
    "written": ({}, "required"),
    "ready": ({"room": _INT}, "none"),  # decode -> coordinator: every byte is in place (the vote)
    "commit": ({"room": _INT}, "none"),  # coordinator -> decode: Success; decode -> other prefill ranks
    "ping": ({}, "none"),
    "pong": ({}, "none"),
    "unknown": ({}, "none"),  # prefill -> decode: you are not (or no longer) a peer of mine
}


OPTIONAL: dict[str, frozenset[str]] = {
    "room": frozenset({"state", "fingerprint"}),
    "abort": frozenset({"fingerprint"}),
}
"""Fields a peer may leave out (read as None): a room without state rows or fingerprint need not say so."""


class Message(NamedTuple):
    """A decoded control message."""

    type: str
    fields: dict[str, Any]
    payload: bytes


def encode(kind: str, fields: dict[str, Any] | None = None, payload: bytes = b"") -> list[bytes]:
    """Frames for one message; raises ValueError for a message we could not decode."""
    fields = dict(fields or {})
    if kind not in SCHEMA:
        raise ValueError(f"unknown message type {kind!r}")
    header = json.dumps({"type": kind, **fields}, separators=(",", ":")).encode()
    message = Message(kind, fields, payload)
    _check(message, len(header))
    frames = [MAGIC, header]
    if SCHEMA[kind][1] == "required":
        frames.append(payload)
    return frames


def decode(frames: list[bytes], max_bytes: int) -> Message:
    """Parse and validate frames from a peer; raises ProtocolError."""
    if not isinstance(frames, list) or len(frames) not in (2, 3):
        raise ProtocolError(f"expected 2 or 3 frames, got {len(frames) if isinstance(frames, list) else '?'}")
    magic, header = bytes(frames[0]), bytes(frames[1])
    if magic[:3] != MAGIC[:3] or len(magic) != len(MAGIC):
        raise ProtocolError("not a kvroom control frame (bad magic)")
    if magic != MAGIC:
        raise ProtocolError(f"unsupported protocol version {magic[3]} (this side speaks {VERSION})")
    total = sum(len(f) for f in frames)
    if total > max_bytes:
        raise ProtocolError(f"message of {total} bytes exceeds the {max_bytes}-byte cap")
    if len(header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        data = json.loads(header)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"header is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ProtocolError("header has no message type")
    kind = data.pop("type")
    if kind not in SCHEMA:
        raise ProtocolError(f"unknown message type {kind!r}")
    needs_payload = SCHEMA[kind][1] == "required"
    if needs_payload != (len(frames) == 3):
        raise ProtocolError(f"{kind}: wrong number of frames ({len(frames)})")
    message = Message(kind, data, bytes(frames[2]) if needs_payload else b"")
    _check(message, len(header))
    return message


def _check(message: Message, header_len: int) -> None:
    spec, _ = SCHEMA[message.type]
    for name, types in spec.items():
        value = message.fields.get(name, ...)
        if value is ... and name in OPTIONAL.get(message.type, ()):
            message.fields[name] = value = None
        if value is ...:
            raise ProtocolError(f"{message.type}: missing field {name!r}")
        if isinstance(value, bool) or not isinstance(value, types):
            raise ProtocolError(f"{message.type}: field {name!r} has type {type(value).__name__}")
    extra = set(message.fields) - set(spec)
    if extra:
        raise ProtocolError(f"{message.type}: unexpected fields {sorted(extra)}")
    if message.type == "room":
        room, npages, prefix = (message.fields[k] for k in ("room", "npages", "prefix_pages"))
        if npages < 0 or prefix < 0 or not 0 <= room < 2**64:
            raise ProtocolError("room: negative or out-of-range numbers")
        if len(message.payload) != npages * 8:
            raise ProtocolError(f"room: payload of {len(message.payload)} bytes for {npages} pages")
        staging, chunk = message.fields["staging"], message.fields["chunk_pages"]
        if staging is not None:
            if chunk <= 0 or len(staging) != -(-npages // chunk):
                raise ProtocolError(f"room: {len(staging)} staging chunks for {npages} pages of {chunk}")
            if any(isinstance(u, bool) or not isinstance(u, int) or u < 0 for u in staging):
                raise ProtocolError("room: staging offsets must be non-negative ints")
        state = message.fields["state"]
        if state is not None and not all(
            isinstance(rows, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in rows)
            for rows in state.values()
        ):
            raise ProtocolError("room: state rows must be lists of ints per index space")
    if message.type in ("room", "abort"):
        fingerprint = message.fields["fingerprint"]
        if fingerprint is not None and not 0 < len(fingerprint) <= MAX_FINGERPRINT:
            raise ProtocolError(f"{message.type}: fingerprint of {len(fingerprint)} characters")
    if message.type == "written" and not parse_notifs(message.payload):
        raise ProtocolError("written: the payload is not a list of WRITE notifications")
    if message.type in ("abort", "failed", "ready", "commit") and not 0 <= message.fields["room"] < 2**64:
        raise ProtocolError(f"{message.type}: room id out of range")
