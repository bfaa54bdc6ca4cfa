"""NIXL exceptions map onto kvroom's transport errors; nothing else does."""

from __future__ import annotations

import pytest

from kvroom.errors import BackendError, IncompatiblePeerError, PeerLostError, TransferCancelledError
from kvroom.transport.faults import MAX_DETAIL, MAX_REASON, bounded, classify, for_room, is_nixl_error

nixl_bindings = pytest.importorskip("nixl._bindings")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("nixlRemoteDisconnectError", PeerLostError),
        ("nixlNotFoundError", PeerLostError),
        ("nixlCancelledError", TransferCancelledError),
        ("nixlBackendError", BackendError),
        ("nixlInvalidParamError", BackendError),
    ],
)
def test_nixl_errors_are_classified(name: str, expected: type[Exception]) -> None:
    exc = getattr(nixl_bindings, name)("NIXL_ERR_X")
    error = classify(exc, "WRITE room 7 to decode-a")
    assert isinstance(error, expected)
    assert "WRITE room 7 to decode-a" in str(error) and name in str(error)
    assert error.__cause__ is exc


def test_programming_errors_are_not_classified() -> None:
    assert classify(TypeError("bug"), "x") is None
    assert not is_nixl_error(KeyError("k"))


def test_a_nixl_message_is_bounded() -> None:
    exc = nixl_bindings.nixlBackendError("x" * 10_000)
    error = classify(exc, "WRITE to decode-a")
    assert error is not None
    assert str(error).startswith("WRITE to decode-a: nixlBackendError: x")
    assert len(str(error)) <= len("WRITE to decode-a: nixlBackendError: ") + MAX_DETAIL


@pytest.mark.parametrize("error", [PeerLostError("WRITE to decode-a: lost"), IncompatiblePeerError("no")])
def test_one_rooms_error_names_that_room_only(error: Exception) -> None:
    error.__cause__ = cause = RuntimeError("nixl")
    mine = for_room(error, 7, "decode peer decode-a lost")
    assert type(mine) is type(error) and mine is not error
    assert str(mine) == f"room 7: decode peer decode-a lost: {error}"
    assert mine.__cause__ is cause
    assert str(for_room(error, 8)) == f"room 8: {error}"


def test_one_rooms_reason_is_bounded() -> None:
    mine = for_room(BackendError("y" * 5000), 7)
    assert len(str(mine)) == MAX_REASON and str(mine).endswith("...")
    assert bounded("short") == "short"


class _Raising:
    """A NIXL agent whose ``get_new_notifs`` raises ``exc``."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def get_new_notifs(self) -> dict[str, list[bytes]]:
        raise self.exc


def test_progress_keeps_nixl_faults_to_the_transfers_and_raises_bugs() -> None:
    """A NIXL fault seen while only driving progress belongs to no transfer: not raised (the
    transfers' polls and the heartbeats report it); anything else is a bug and is raised."""
    from kvroom.transport.nixl import NixlAgent

    agent = NixlAgent.__new__(NixlAgent)  # no backend: only the call's fault policy is tested
    agent._agent = _Raising(nixl_bindings.nixlRemoteDisconnectError("NIXL_ERR_REMOTE_DISCONNECT"))
    agent.progress()
    agent._agent = _Raising(TypeError("bug"))
    with pytest.raises(TypeError, match="bug"):
        agent.progress()
