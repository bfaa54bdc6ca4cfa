"""The ZMQ control plane: a ROUTER on prefill, one DEALER per prefill on decode.

Agent metadata, room transfer info, aborts, failure notices and heartbeats
travel here (NIXL's own listen-thread exchange fails silently; RESEARCH.md).
Sockets never block the caller: sends use ``NOBLOCK`` and drop on a full
queue (the heartbeat then notices a dead peer); inbound messages are capped
with ``MAXMSGSIZE``.  Every socket belongs to the manager's worker thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq

from kvroom.errors import BootstrapError, ProtocolError
from kvroom.transport.auth import CurveKeys, HandshakeCounter, ServerAuth, secure_client
from kvroom.transport.codec import Message, decode, encode

__all__ = ["parse_addresses", "ControlServer", "ControlClient", "parse_address"]


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port); raises ValueError."""
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"bootstrap address must be 'host:port', got {address!r}")
    host, _, port_text = address.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bootstrap address {address!r} has a non-numeric port") from None
    if not host or not 0 <= port < 65536:
        raise ValueError(f"bootstrap address {address!r} is out of range")
    return host, port


def parse_addresses(addresses: str | Sequence[str]) -> tuple[str, ...]:
    """One address or one per prefill tensor-parallel rank (in rank order), validated."""
    if isinstance(addresses, str):
        addresses = (addresses,)
    if not isinstance(addresses, Sequence) or not addresses:
        raise ValueError(f"expected a bootstrap address or a non-empty list of them, got {addresses!r}")
    out = tuple(addresses)
    for address in out:
        parse_address(address)
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate bootstrap addresses in {list(out)}")
    return out


CLOSE_LINGER_MS = 500
"""How long closing a socket may take to deliver what is still queued (a COMMIT sent just before
a manager closes must reach decode, or the two sides disagree); bounded for a peer that is gone."""


def _socket(ctx: zmq.Context[Any], kind: int, max_bytes: int) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    sock.setsockopt(zmq.SNDHWM, 10000)
    sock.setsockopt(zmq.RCVHWM, 10000)
    return sock


class ControlServer:
    """Prefill's ROUTER socket: one listening address, many decode peers.

    With ``auth`` it is a CURVE server: only trusted decode keys complete the
    handshake, every message carries its sender's key (``User-Id``), and
    refused handshakes are counted (:attr:`refused`).
    """

    def __init__(
        self, ctx: zmq.Context[Any], host: str, port: int, max_bytes: int, auth: ServerAuth | None = None
    ) -> None:
        self.max_bytes = max_bytes
        self.auth = auth
        self.socket = _socket(ctx, zmq.ROUTER, max_bytes)
        self.handshakes: HandshakeCounter | None = None
        if auth is not None:
            auth.secure(self.socket)
            self.handshakes = HandshakeCounter(self.socket)
        try:
            if port == 0:
                port = self.socket.bind_to_random_port(f"tcp://{host}")
            else:
                self.socket.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as exc:
            if self.handshakes is not None:
                self.handshakes.close()
            self.socket.close()
            raise BootstrapError(
                f"cannot listen on {host}:{port}: {exc.strerror}; "
                "choose another port or stop the process using it"
            ) from None
        self.address = f"{host}:{port}"

    @property
    def refused(self) -> int:
        """Handshakes refused so far (untrusted key, plain text, wrong server key); 0 without auth."""
        return self.handshakes.failed if self.handshakes is not None else 0

    def count_refusals(self) -> int:
        """Worker: read the socket monitor (so its queue never fills); new refusals since the last call."""
        return self.handshakes.drain() if self.handshakes is not None else 0

    def recv(self) -> tuple[bytes, str | None, Message | ProtocolError] | None:
        """One message if any is waiting: (routing identity, authenticated key or None, message or error)."""
        if self.auth is None:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return None
            identity, body = frames[0], frames[1:]
            user: str | None = None
        else:
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            try:  # the ZAP handler's User-Id: the client's z85 public key
                user = str(parts[-1].get("User-Id"))
            except zmq.ZMQError:
                user = None
            identity, body = parts[0].bytes, [p.bytes for p in parts[1:]]
        try:
            return identity, user, decode(body, self.max_bytes)
        except ProtocolError as exc:
            return identity, user, exc

    def send(
        self, identity: bytes, kind: str, fields: dict[str, Any] | None = None, payload: bytes = b""
    ) -> bool:
        """Send to one peer; False when it could not be queued."""
        try:
            self.socket.send_multipart([identity, *encode(kind, fields, payload)], zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def close(self) -> None:
        """Close the socket."""
        if self.handshakes is not None:
            self.handshakes.close()
        self.socket.close(linger=CLOSE_LINGER_MS)


class ControlClient:
    """Decode's DEALER socket to one prefill bootstrap address (a CURVE client with ``keys``)."""

    def __init__(
        self, ctx: zmq.Context[Any], address: str, max_bytes: int, keys: CurveKeys | None = None
    ) -> None:
        host, port = parse_address(address)
        self.address = address
        self.max_bytes = max_bytes
        self.socket = _socket(ctx, zmq.DEALER, max_bytes)
        self.refusals: HandshakeCounter | None = None
        if keys is not None:
            try:
                secure_client(self.socket, keys, address)
            except ValueError:
                self.socket.close(linger=0)
                raise
            self.refusals = HandshakeCounter(self.socket, zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self.socket.connect(f"tcp://{host}:{port}")

    def refused(self) -> bool:
        """True once the server refused our key (its ZAP handler said no); worker thread only."""
        if self.refusals is None:
            return False
        self.refusals.drain()
        return self.refusals.failed > 0

    def recv(self) -> Message | ProtocolError | None:
        """One message if any is waiting (or the decode error)."""
        try:
            frames = self.socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        try:
            return decode(frames, self.max_bytes)
        except ProtocolError as exc:
            return exc

    def send(self, kind: str, fields: dict[str, Any] | None = None, payload: bytes = b"") -> bool:
        """Send to the prefill; False when it could not be queued."""
        try:
            self.socket.send_multipart(encode(kind, fields, payload), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def close(self) -> None:
        """Close the socket."""
        if self.refusals is not None:
            self.refusals.close()
        self.socket.close(linger=CLOSE_LINGER_MS)
