"""Signed routes: with kvroom's keys, only a trusted prefill key writes SGLang's bootstrap table.

SGLang's bootstrap server takes any ``PUT /route`` (SGLang issue #39400):
whoever reaches it can point decode at their own address or replace a prefill
rank's entry.  kvroom's decode already refuses a prefill whose CURVE key it does
not trust, so a poisoned route reads no KV, but it fails rooms.

With keys (``KVROOM_KEY_FILE``), each prefill rank seals its route payload with
NaCl's ``Box`` (X25519 and XSalsa20-Poly1305, libsodium through PyNaCl) from
its CURVE secret key to the bootstrap server's public key, and sends the box in
the payload's ``kvroom_proof`` field.  The server's key is, by default, the
prefill's own (SGLang runs the bootstrap server in the prefill server's process,
which has the same ``KVROOM_KEY_FILE``); ``KVROOM_BOOTSTRAP_KEY`` names the
server's ``.key`` file when it holds another.

:class:`RouteGuard` (the server's side) opens the box with the server's secret
key and each trusted prefill public key (its own, and the ``*.key`` files in
``KVROOM_PREFILL_KEYS``), and accepts the route only when the sealed copy
equals the payload and its timestamp is newer than the last one accepted for
that rank's slot: an old registration replayed cannot point a slot back at an
address the rank left.  Without a key on the server nothing changes.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

__all__ = ["PROOF", "RouteGuard", "seal", "server_public_key"]

PROOF = "kvroom_proof"
"""The ``PUT /route`` payload field that carries the sealed copy."""

_STAMP = "kvroom_ts"
_SLOT = ("attn_dp_rank", "system_dp_rank", "attn_cp_rank", "attn_tp_rank", "pp_rank")


def _raw(z85: bytes) -> bytes:
    return bytes(zmq.utils.z85.decode(z85))


def _canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in payload.items() if k != PROOF}, sort_keys=True).encode()


def server_public_key(own_public: bytes) -> bytes:
    """The bootstrap server's public key (z85): ``KVROOM_BOOTSTRAP_KEY``'s, else this process's own."""
    path = os.environ.get("KVROOM_BOOTSTRAP_KEY")
    if not path:
        return own_public
    public, _ = zmq.auth.load_certificate(path)
    return bytes(public)


def seal(
    payload: dict[str, Any], secret: bytes, server_public: bytes, now: float | None = None
) -> dict[str, Any]:
    """``payload``, stamped, with its ``kvroom_proof``: sealed from ``secret`` to ``server_public`` (z85)."""
    stamped = {**payload, _STAMP: time.time() if now is None else now}
    box = Box(PrivateKey(_raw(secret)), PublicKey(_raw(server_public)))
    proof = base64.b64encode(bytes(box.encrypt(_canonical(stamped)))).decode()
    return {**stamped, PROOF: proof}


class RouteGuard:
    """The server's check of one ``PUT /route`` payload; keeps each slot's last accepted timestamp."""

    def __init__(self, public: bytes, secret: bytes, trusted: frozenset[bytes]) -> None:
        self._secret = PrivateKey(_raw(secret))
        self._trusted = [PublicKey(_raw(k)) for k in sorted(trusted | {public})]
        self._last: dict[tuple[Any, ...], float] = {}

    @classmethod
    def from_env(cls) -> RouteGuard | None:
        """The guard for ``KVROOM_KEY_FILE`` (and ``KVROOM_PREFILL_KEYS``); None without a key file."""
        key_file = os.environ.get("KVROOM_KEY_FILE")
        if not key_file:
            return None
        public, secret = zmq.auth.load_certificate(key_file)
        if secret is None:
            raise ValueError(f"KVROOM_KEY_FILE={key_file} holds no secret key (pass the .key_secret file)")
        extra: set[bytes] = set()
        directory = os.environ.get("KVROOM_PREFILL_KEYS")
        if directory:
            extra = {bytes(k) for k in zmq.auth.load_certificates(str(Path(directory)))}
        return cls(bytes(public), bytes(secret), frozenset(extra))

    def check(self, payload: dict[str, Any]) -> str | None:
        """Why ``payload`` is refused, or None when a trusted prefill key sealed it and it is newer."""
        proof = payload.get(PROOF)
        if not isinstance(proof, str):
            return "the route carries no kvroom_proof: it was not sealed with a trusted prefill key"
        try:
            sealed = base64.b64decode(proof, validate=True)
        except ValueError:
            return "kvroom_proof is not base64"
        for key in self._trusted:
            try:
                opened = Box(self._secret, key).decrypt(sealed)
            except CryptoError:
                continue
            if opened != _canonical(payload):
                return "the sealed copy differs from the route payload"
            stamp = float(payload.get(_STAMP, 0.0))
            slot = tuple(payload.get(k) for k in _SLOT)
            if stamp <= self._last.get(slot, float("-inf")):
                return "an older registration of this rank (replayed)"
            self._last[slot] = stamp
            return None
        return "kvroom_proof was not sealed with a trusted prefill key"
