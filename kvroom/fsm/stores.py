"""Per-room stores: every piece of state a room owns lives in one of these.

A store refuses writes for a room that has been cleaned up, so a late worker or
a late message can never resurrect a room (the SGLang ``update_status`` bug).
Writes take the room's lock, so a write and the cleanup cannot interleave.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from kvroom.fsm.room import Room

__all__ = ["Store", "RoomStore", "KeyedStore", "StoreSet"]

V = TypeVar("V")


class Store:
    """Interface the room table uses for cleanup and footprints."""

    name: str

    def holds(self, room_id: int) -> bool:
        """True when the store still has state for ``room_id``."""
        raise NotImplementedError

    def discard_room(self, room_id: int) -> bool:
        """Drop every entry of ``room_id``; True when something was held."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


class RoomStore(Store, Generic[V]):
    """One value per room, keyed by room id."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._data: dict[int, V] = {}

    def put(self, room: Room, value: V) -> bool:
        """Store ``value`` for a live room; returns False (and stores nothing) otherwise."""
        with room.lock:
            return self.put_locked(room, value)

    def put_locked(self, room: Room, value: V) -> bool:
        """Like :meth:`put` for a caller that already holds ``room.lock``."""
        if not room.live:
            return False
        self._data[room.id] = value
        return True

    def get(self, room_id: int, default: V | None = None) -> V | None:
        """The value held for ``room_id``, or ``default``."""
        return self._data.get(room_id, default)

    def holds(self, room_id: int) -> bool:
        return room_id in self._data

    def discard_room(self, room_id: int) -> bool:
        return self._data.pop(room_id, None) is not None

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._data))


class KeyedStore(Store, Generic[V]):
    """Several entries per room, keyed by tuples whose first item is the room id.

    Used for staging prefetch requests keyed by ``(room, chunk, session)``.  An
    index from room id to its keys makes cleanup O(entries of that room).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._data: dict[tuple[Hashable, ...], V] = {}
        self._by_room: dict[int, set[tuple[Hashable, ...]]] = {}

    def put(self, room: Room, key: tuple[Hashable, ...], value: V) -> bool:
        """Store ``value`` under ``key`` (``key[0]`` must be the room id)."""
        with room.lock:
            return self.put_locked(room, key, value)

    def put_locked(self, room: Room, key: tuple[Hashable, ...], value: V) -> bool:
        """Like :meth:`put` for a caller that already holds ``room.lock``."""
        if not key or key[0] != room.id:
            raise ValueError(f"key {key!r} does not start with room id {room.id}")
        if not room.live:
            return False
        self._data[key] = value
        self._by_room.setdefault(room.id, set()).add(key)
        return True

    def pop(self, room: Room, key: tuple[Hashable, ...]) -> V | None:
        """Remove and return one entry of a room."""
        with room.lock:
            value = self._data.pop(key, None)
            keys = self._by_room.get(room.id)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_room[room.id]
        if value is not None:
            self.removed(value)
        return value

    def removed(self, value: V) -> None:
        """Called once for every entry that leaves the store (pop or cleanup); a hook for
        stores whose values hold a resource."""

    def get(self, key: tuple[Hashable, ...]) -> V | None:
        """The value held under ``key``, if any."""
        return self._data.get(key)

    def keys_of(self, room_id: int) -> frozenset[tuple[Hashable, ...]]:
        """Every key held for ``room_id``."""
        return frozenset(self._by_room.get(room_id, ()))

    def holds(self, room_id: int) -> bool:
        return room_id in self._by_room

    def discard_room(self, room_id: int) -> bool:
        keys = self._by_room.pop(room_id, None)
        if not keys:
            return False
        for key in keys:
            value = self._data.pop(key, None)
            if value is not None:
                self.removed(value)
        return True

    def __len__(self) -> int:
        return len(self._data)


class StoreSet:
    """The stores registered for one role's rooms (the room table's): cleanup empties them all.

    ``request_status`` (the registry of live rooms itself) is always the first name.
    """

    def __init__(self) -> None:
        self._stores: list[Store] = []
        self._store_names: set[str] = {"request_status"}

    def register_store(self, store: Any) -> Any:
        """Add a store; its state is removed whenever a room is cleaned up."""
        if not isinstance(store, Store):
            raise TypeError(f"expected a Store, got {type(store).__name__}")
        if store.name in self._store_names:
            raise ValueError(f"a store named {store.name!r} is already registered")
        self._store_names.add(store.name)
        self._stores.append(store)
        return store

    @property
    def store_names(self) -> tuple[str, ...]:
        """Names of every registered store, ``request_status`` first."""
        return ("request_status", *(s.name for s in self._stores))

    def put_all(self, stores: Iterable[tuple[RoomStore[Any], Any]], room: Room) -> bool:
        """Write several stores for one room atomically; False if the room is gone."""
        with room.lock:
            if not room.live:
                return False
            for store, value in stores:
                store.put_locked(room, value)
            return True
