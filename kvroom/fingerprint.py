"""Request fingerprints: which request a room's KV belongs to, checked before any byte moves.

A room id is the router's promise that prefill and decode serve one request.  Routers reuse ids,
mix them up, or give one id to two requests; the page count alone cannot tell two prompts of
equal length apart, and decode would then continue another request's KV with HTTP 200.  Each side
gives its request's fingerprint with the room (prefill: ``KVSender(..., fingerprint=)``; decode:
``KVReceiver.send_metadata(..., fingerprint=)``); decode's page list carries its fingerprint, and
prefill fails the room on both sides at once (:class:`~kvroom.errors.RequestMismatchError`)
when both sides gave one and they differ.  A side that gives none is not checked.

:func:`request_fingerprint` is the token count and a BLAKE2b digest of the token ids: cheap
(about a microsecond per hundred tokens), the same in every process and engine.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Iterable

from kvroom.transport.codec import MAX_FINGERPRINT

__all__ = ["request_fingerprint", "check_fingerprint", "MAX_FINGERPRINT"]


def request_fingerprint(token_ids: Iterable[int]) -> str:
    """``"<count>:<hex digest>"`` of a request's prompt token ids (what its KV was computed from)."""
    ids = array("q", token_ids)
    if sys.byteorder == "big":
        ids.byteswap()
    return f"{len(ids)}:{hashlib.blake2b(ids.tobytes(), digest_size=16).hexdigest()}"


def check_fingerprint(fingerprint: object) -> None:
    """Raise TypeError/ValueError unless ``fingerprint`` is None or a string of 1-128 characters."""
    if fingerprint is None:
        return
    if not isinstance(fingerprint, str):
        raise TypeError(f"fingerprint must be a str or None, got {type(fingerprint).__name__}")
    if not 0 < len(fingerprint) <= MAX_FINGERPRINT:
        raise ValueError(f"fingerprint must have 1 to {MAX_FINGERPRINT} characters, got {len(fingerprint)}")
