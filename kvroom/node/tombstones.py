"""Tombstones: room ids prefill answers FAILED at once, for everyone or for some decode principals.

A room that failed on prefill is dead for every decode rank: late page lists
for it are answered with its reason.  A decode's abort of a room prefill has
not created (or that no decode bound yet) is dead only for that decode's
*principal* (its authenticated key, or its agent name without keys), so one
peer's abort can never kill another peer's room.  Entries are bounded in age
(``ttl``) and count (``limit``), oldest first.
"""

from __future__ import annotations

import collections
from typing import Any, Generic, TypeVar

__all__ = ["Forgone", "Tombstones"]

K = TypeVar("K")
V = TypeVar("V", bound=tuple[Any, ...])


class _Aged(collections.OrderedDict[K, V], Generic[K, V]):
    """Entries whose value's second item is their expiry, oldest first, at most ``limit``."""

    def __init__(self, limit: int, ttl: float) -> None:
        super().__init__()
        self.limit = limit
        self.ttl = ttl

    def _put(self, key: K, value: V) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)

    def expire(self, now: float) -> None:
        """Forget entries past their age limit."""
        while self and next(iter(self.values()))[1] < now:
            self.popitem(last=False)


class Tombstones(_Aged[int, tuple[str, float, frozenset[str] | None]]):
    """room id -> (reason, expiry, principals it holds for; None: everyone), oldest first."""

    def add(self, room_id: int, reason: str, now: float, principal: str | None = None) -> None:
        """Bury ``room_id`` for everyone, or only for ``principal`` (merged with earlier ones)."""
        old = self.get(room_id)
        who: frozenset[str] | None = None if principal is None else frozenset({principal})
        if old is not None and who is not None:
            who = None if old[2] is None else old[2] | who
        self._put(room_id, (reason, now + self.ttl, who))

    def reason_for(self, room_id: int, principal: str, held_only: bool = False) -> str | None:
        """Why ``room_id`` is dead for ``principal`` (None: it is not).

        ``held_only``: only that principal's own abort counts (a live room of that id).
        """
        tomb = self.get(room_id)
        if tomb is None or (tomb[2] is None and held_only):
            return None
        if tomb[2] is not None and principal not in tomb[2]:
            return None
        return tomb[0]


class Forgone(_Aged[tuple[int, str], tuple[str, float]]):
    """(room id, request fingerprint) -> (reason, expiry): rooms prefill fails as they open.

    A decode request that cannot take a room id (another request of that decode holds it)
    says so with its fingerprint (:meth:`kvroom.KVManager.forgo`); prefill's room for that
    request, and only that request, fails at once instead of at its Bootstrapping deadline.
    Bounded in age and count like :class:`Tombstones`.
    """

    def add(self, room_id: int, fingerprint: str, reason: str, now: float) -> None:
        """Remember that ``fingerprint``'s request will never ask for ``room_id``."""
        self._put((room_id, fingerprint), (reason, now + self.ttl))

    def take(self, room_id: int, fingerprint: str | None) -> str | None:
        """The reason a room for ``fingerprint``'s request must fail (and forget it); None: it need not."""
        if fingerprint is None:
            return None
        entry = self.pop((room_id, fingerprint), None)
        return None if entry is None else entry[0]
